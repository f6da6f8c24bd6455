"""Balance metrics (dsmoe.metrics): MaxVio, normalized load entropy and dead experts, by hand and at the edges
(no tokens, a single expert, batched [layers, E] loads)."""

import math

import pytest
import torch

from dsmoe.metrics import dead_experts, load_entropy, max_violation


@pytest.mark.parametrize("load,expected", [
    ([4, 4, 4, 4], 0.0),
    ([8, 0, 0, 0], 3.0),        # mean 2, max 8
    ([6, 2, 3, 1], 1.0),        # mean 3, max 6
    ([0, 0, 0], 0.0),           # nothing routed: defined as 0, not NaN
    ([5], 0.0),
], ids=["even", "all-on-one", "uneven", "empty", "one-expert"])
def test_max_violation(load, expected):
    torch.testing.assert_close(max_violation(torch.tensor(load)), torch.tensor(expected))


def test_max_violation_batched_over_layers():
    loads = torch.tensor([[4, 4, 4, 4], [8, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(max_violation(loads), torch.tensor([0.0, 3.0, 0.0]))


@pytest.mark.parametrize("load,expected", [
    ([3, 3, 3, 3], 1.0),
    ([5, 0, 0, 0], 0.0),
    ([2, 2, 0, 0], 0.5),                                    # log 2 / log 4
    ([1, 3], -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)),
    ([0, 0, 0], 0.0),                                       # nothing routed
    ([7], 1.0),                                             # E = 1: log(1) = 0 must not divide by zero
    ([0], 1.0),
], ids=["even", "all-on-one", "half", "1-3", "empty", "one-expert", "one-expert-empty"])
def test_load_entropy(load, expected):
    value = load_entropy(torch.tensor(load))
    assert torch.isfinite(value)
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float32))


def test_load_entropy_batched_over_layers():
    loads = torch.tensor([[3, 3, 3, 3], [5, 0, 0, 0]])
    torch.testing.assert_close(load_entropy(loads), torch.tensor([1.0, 0.0]))
    assert load_entropy(torch.tensor([[4], [0]])).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("load,expected", [([1, 0, 2, 0], 2), ([1, 1], 0), ([0, 0, 0], 3)],
                         ids=["two-dead", "none-dead", "all-dead"])
def test_dead_experts(load, expected):
    assert int(dead_experts(torch.tensor(load))) == expected


def test_dead_experts_batched():
    assert dead_experts(torch.tensor([[1, 0], [0, 0]])).tolist() == [1, 2]

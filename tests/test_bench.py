"""The layer benchmark (dsmoe.bench.layer) on a micro shape: every candidate gets a row of finite positive
times, memory and ratios; the CPU memory counter counts what a forward keeps; the command prints a table
and writes JSON."""

import json
import math
import warnings

import pytest
import torch

from dsmoe.bench import layer
from dsmoe.config import MoEConfig
from dsmoe.moe import MoE

MICRO = dict(dim=16, n_routed_experts=4, n_shared_experts=1, top_k=2, expert_dim=8)


@pytest.mark.parametrize("uniform", [False, True], ids=["topk", "uniform"])
def test_bench_layer_rows(uniform):
    rows = layer.bench_layer(MoEConfig(**MICRO, uniform_routing=uniform), tokens=32, repeats=2, warmup=0)
    assert [r.name for r in rows] == ["dsmoe", "reference", "dense"]
    for r in rows:
        for v in (r.fwd_ms, r.fwd_bwd_ms, r.memory_mb, r.fwd_vs_dense, r.fwd_bwd_vs_dense, r.memory_vs_dense):
            assert math.isfinite(v) and v > 0, r
    assert rows[-1].fwd_vs_dense == rows[-1].memory_vs_dense == 1.0


@pytest.mark.parametrize("tokens", [1, 32])
def test_matmul_floor(tokens):
    """Finite positive ratios, also when most experts get no token (their blocks are skipped)."""
    moe = MoE(MoEConfig(**MICRO))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an out= buffer of the wrong shape warns before it is resized
        floor = layer.matmul_floor(moe, torch.randn(tokens, 16), repeats=2, warmup=0)
    assert all(math.isfinite(v) and v > 0 for v in floor.values()), floor
    assert floor["fwd_vs_dense"] == floor["dsmoe_fwd_ms"] / floor["dense_fwd_ms"]


def test_cpu_forward_memory_counts_saved_activations():
    """A Linear forward keeps its output; a ReLU on top keeps one more tensor of the same size."""
    x = torch.randn(64, 32, requires_grad=True)
    lin = torch.nn.Linear(32, 32, bias=False)
    one = layer.forward_memory(lin, x)
    two = layer.forward_memory(torch.nn.Sequential(lin, torch.nn.ReLU()), x)
    assert one == 64 * 32 * 4
    assert two == 2 * 64 * 32 * 4


def test_cli_prints_table_and_json(tmp_path, capsys):
    from dsmoe.cli import main

    out = tmp_path / "layer.json"
    assert main(["bench", "layer", "--dim", "16", "--experts", "4", "--expert-dim", "8", "--shared", "1",
                 "--top-k", "2", "--tokens", "16", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("machine:", "memory =", "dsmoe", "reference", "dense", "matmuls alone"):
        assert name in text
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["rows"]] == ["dsmoe", "reference", "dense"]
    assert result["matmul_floor"]["fwd_bwd_vs_dense"] > 0


def test_bf16_on_cpu_is_refused():
    from dsmoe.cli import main

    with pytest.raises(SystemExit, match="bf16"):
        main(["bench", "layer", "--dtype", "bf16", "--tokens", "8", "--repeats", "1"])

"""The layer benchmark (dsmoe.bench.layer): every candidate gets a row of finite positive times, memory and
ratios; the timing harness ranks a candidate that does more work (a known sleep) as slower by that much;
the CPU memory counter counts what a forward keeps, exactly, so the memory ratios are checked as facts
(the fast path keeps less than the reference loop, and at most 1.3x a dense FFN of equal active width);
the command prints a table and writes JSON. Speed ratios of the real layers are benchmark output (README),
not test assertions: timings on a shared machine are noise."""

import json
import math
import time
import warnings

import pytest
import torch

from dsmoe.bench import layer
from dsmoe.cli import main
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


class Sleepy(torch.nn.Module):
    """A module plus a fixed delay in every forward: a candidate known to be slower by that much."""

    def __init__(self, inner, seconds):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x)


def test_harness_measures_a_known_delay():
    lin = torch.nn.Linear(16, 16)
    rows = layer.compare({"slow": Sleepy(lin, 0.02), "fast": lin}, torch.randn(8, 16, requires_grad=True),
                         repeats=3, warmup=1)
    slow, fast = rows
    assert 20 <= slow.fwd_ms and 20 <= slow.fwd_bwd_ms  # the delay is in both timings
    assert slow.fwd_ms - fast.fwd_ms >= 15 and slow.fwd_vs_dense > 1 and fast.fwd_vs_dense == 1
    assert slow.memory_mb == fast.memory_mb  # a sleep allocates nothing


def test_memory_ratios_in_range():
    """D 64, 16 experts of width 32, top-4, 1 shared, 256 tokens: the fast path saves only the gate and up
    pre-activations of the routed experts; the reference loop keeps every intermediate."""
    cfg = MoEConfig(dim=64, n_routed_experts=16, n_shared_experts=1, top_k=4, expert_dim=32)
    rows = {r.name: r for r in layer.bench_layer(cfg, tokens=256, repeats=1, warmup=0)}
    assert rows["dsmoe"].memory_mb < rows["reference"].memory_mb / 2
    assert 0.5 < rows["dsmoe"].memory_vs_dense <= 1.3


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

    out = tmp_path / "layer.json"
    assert main(["bench", "layer", "--dim", "16", "--experts", "4", "--expert-dim", "8", "--shared", "1",
                 "--top-k", "2", "--tokens", "16", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("machine:", "memory =", "dsmoe", "reference", "dense", "matmuls alone"):
        assert name in text
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["rows"]] == ["dsmoe", "reference", "dense"]
    assert result["matmul_floor"]["fwd_bwd_vs_dense"] > 0


def test_bf16_on_cpu_is_refused(capsys):

    assert main(["bench", "layer", "--dtype", "bf16", "--tokens", "8", "--repeats", "1"]) == 1
    assert "--dtype bf16 is only benchmarked on --device cuda" in capsys.readouterr().out


def test_sweep_covers_each_axis_and_plots(tmp_path):
    """One row per point of each axis, the shape each point names, ratios taken from its own timings."""
    base = MoEConfig(**MICRO)
    axes = {"tokens": (8, 16), "experts": (4, 8), "top_k": (1, 2)}
    rows = layer.sweep(base, 16, repeats=1, warmup=0, axes=axes)
    assert [(r["axis"], r["value"]) for r in rows] == [(a, v) for a, vs in axes.items() for v in vs]
    assert [r["tokens"] for r in rows[:2]] == [8, 16] and [r["experts"] for r in rows[2:4]] == [4, 8]
    assert [r["top_k"] for r in rows[4:]] == [1, 2]
    assert all(math.isfinite(r["fwd_vs_dense"]) and r["fwd_bwd_vs_dense"] > 0 for r in rows)
    from dsmoe import plots
    plots.plot_layer_sweep(rows, tmp_path / "sweep.png", "test")
    assert (tmp_path / "sweep.png").stat().st_size > 1000


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the machine without a GPU")
def test_gpu_check_says_no_gpu_and_succeeds():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("no GPU"), out.stdout + out.stderr


@pytest.mark.slow
def test_bench_ep_measures_layer_layouts_and_checkpoints(tmp_path, capsys):
    """`dsmoe bench ep` end to end at micro sizes: the all-to-all rows, a row per mesh layout with each rank's
    share of the state, and both checkpoint formats timed."""
    out = tmp_path / "ep.json"
    assert main(["bench", "ep", "--worlds", "2", "--repeats", "1", "--warmup", "0", "--tokens", "16", "--preset",
                 "debug", "--batch-size", "4", "--seq-len", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["limit"] for r in result["layer"]] == ["M=1", "unlimited"]
    assert [r["layout"] for r in result["layouts"]] == ["dp 4", "dp 2 x ep 2", "ep 4"]
    assert [r["format"] for r in result["checkpoints"]] == ["gathered", "dcp"]
    for r in result["layouts"] + result["checkpoints"]:
        assert all(math.isfinite(v) and v >= 0 for k, v in r.items() if k not in ("layout", "format")), r
    replicated, sharded = result["checkpoints"][0]["state_mb"], result["layouts"][0]["state_mb"]
    assert sharded < replicated  # FSDP2 shards what expert parallelism alone replicates
    assert "dcp / gathered" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_pp_times_each_schedule_beside_one_process(tmp_path, capsys):
    """`dsmoe bench pp` end to end at micro sizes: the one-process row, then a row per schedule and micro-batch
    count with a bubble in [0, 1) beside the planner's, and each rank's allocated memory beside the planner's figure;
    1F1B with fewer micro-batches than stages is skipped."""
    out = tmp_path / "pp.json"
    assert main(["bench", "pp", "--pp", "1", "2", "--microbatches", "1", "2", "--preset", "debug", "--layers", "2",
                 "--batch-size", "4", "--seq-len", "16", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pp"], r["schedule"], r["microbatches"]) for r in rows] == [
        (1, "1f1b", 1), (2, "1f1b", 2), (2, "gpipe", 1), (2, "gpipe", 2)]
    for r in rows[1:]:
        assert 0 <= r["bubble"] < 1 and r["planner_bubble"] == pytest.approx(1 / (r["microbatches"] + 1))
        assert r["step_ms"] > 0 and r["peak_rss_mb"] > 0
    from dsmoe.bench.pp import allocated

    for r in rows:  # every rank's allocated peak beside the planner's figure for it (where glibc tells)
        assert len(r["planner_mb"]) == r["pp"] and all(p > 0 for p in r["planner_mb"])
        assert r["allocated_mb"] == [] if allocated() is None else \
            len(r["allocated_mb"]) == r["pp"] and all(a > 0 for a in r["allocated_mb"])
    assert "planner" in capsys.readouterr().out
    assert main(["bench", "pp", "--pp", "3", "--preset", "debug", "--layers", "2"]) == 1
    assert "--pp 3 must be between 1 and --layers 2" in capsys.readouterr().out

"""`dsmoe bench model` (dsmoe.bench.model): on a micro DeepSeek-V3 shape dsmoe and transformers run the same
weights (equal logits), every row has finite positive times and memory, the ratios are computed from those
times, greedy generation gives positive tokens/s and the same tokens with and without dsmoe's cache and from
transformers; the command prints its table and writes JSON, and a shape that cannot route is a one-line error.
Speed ratios are benchmark output (README), not test assertions: timings on a shared machine are noise."""

import json
import math

import pytest

from dsmoe import cli
from dsmoe.bench import model as bench

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("transformers", minversion="5.0")

MICRO = bench.Shape(hidden=32, layers=2, heads=2, kv_lora_rank=16, q_lora_rank=16, qk_nope=8, qk_rope=4, v_head=8,
                    experts=8, top_k=2, expert_dim=16, n_group=2, topk_group=1, batch=2, seq=16, max_seq_len=64)
MICRO_ARGS = ["--hidden", "32", "--layers", "2", "--heads", "2", "--experts", "8", "--top-k", "2", "--expert-dim", "16",
              "--groups", "2", "--topk-groups", "1", "--batch-size", "2", "--seq-len", "16"]


def test_rows_and_ratios():
    r = bench.bench_model(MICRO, repeats=2, warmup=0, new_tokens=3, prompt=4)
    assert [row.name for row in r.rows] == ["dsmoe", "transformers"]
    assert r.max_logit_diff < 1e-4 and r.experts_implementation
    ours, theirs = r.rows
    for row in r.rows:
        for v in (row.fwd_ms, row.fwd_bwd_ms, row.memory_mb):
            assert math.isfinite(v) and v > 0, row
    assert ours.fwd_vs_dsmoe == ours.fwd_bwd_vs_dsmoe == ours.memory_vs_dsmoe == 1.0
    assert theirs.fwd_vs_dsmoe == theirs.fwd_ms / ours.fwd_ms
    assert theirs.fwd_bwd_vs_dsmoe == theirs.fwd_bwd_ms / ours.fwd_bwd_ms
    assert theirs.memory_vs_dsmoe == theirs.memory_mb / ours.memory_mb
    assert [g.name for g in r.generation] == ["dsmoe (latent KV cache)", "dsmoe (no cache)", "transformers (cache)"]
    assert all(g.tokens_per_s > 0 and g.tokens_per_s == pytest.approx(3 / g.seconds) for g in r.generation)
    assert r.same_tokens
    table = bench.format_table(r)
    assert f"{theirs.fwd_bwd_vs_dsmoe:.2f}x in forward+backward" in table


def test_cli_prints_table(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert cli.main(["bench", "model", *MICRO_ARGS, "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
                     "--no-memory", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "transformers' experts:" in out and "greedy generation" in out
    assert out.count("dsmoe ") >= 2 and "transformers " in out
    saved = json.loads(path.read_text())
    assert [r["name"] for r in saved["rows"]] == ["dsmoe", "transformers"] and saved["machine"]


def test_cli_bad_shape_is_one_line(capsys):
    assert cli.main(["bench", "model", *MICRO_ARGS, "--top-k", "5"]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("dsmoe bench: error:") and "--top-k 5" in out and "\n" not in out

"""dsmoe.plots: `dsmoe report` writes every PNG from a synthetic metrics.jsonl shaped like a real run's (MoE
and dense), through the function and the CLI, and bad run directories get clear errors; the studies'
figures are drawn from synthetic aggregated rows."""

import json
import math
import random
import re

import pytest

from dsmoe import cli, plots

MOE_PLOTS = ["loss.png", "maxvio.png", "load_final.png", "load_evolution.png", "load_over_time.png"]


def write_metrics(run_dir, steps=200, log_every=10, eval_every=50, layers=3, experts=16, dense=False):
    """A run whose load starts skewed and evens out, as loss-free balancing makes it do."""
    rng = random.Random(0)
    rows = []

    def load(step):
        rows = []
        for layer in range(layers):
            skew = math.exp(-step / (40 + 30 * layer))
            weights = [1 + 3 * skew * (e % 4 == layer % 4) + 0.1 * rng.random() for e in range(experts)]
            rows.append([round(1000 * w / sum(weights)) for w in weights])
        return rows

    def maxvio(load_LE):
        return [(max(row) - sum(row) / len(row)) / (sum(row) / len(row)) for row in load_LE]

    for step in range(log_every, steps + 1, log_every):
        lo = [] if dense else load(step)
        rows.append({"kind": "train", "step": step, "loss": 5 * math.exp(-step / 100) + 1 + 0.1 * rng.random(),
                     "aux_loss": 0.0, "lr": 1e-3, "tokens_per_s": 1000.0, "top_k": 2,
                     "maxvio": maxvio(lo), "load": lo})
        if step % eval_every == 0:
            lo = [] if dense else load(step)
            val = 5 * math.exp(-step / 100) + 1.2
            rows.append({"kind": "eval", "step": step, "val_loss": val, "val_ppl": math.exp(val),
                         "maxvio_global": maxvio(lo), "load": lo})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def assert_pngs(paths, names):
    assert sorted(p.name for p in paths) == sorted(names)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


SHAPES = {"3x16": dict(layers=3, experts=16), "1x64": dict(layers=1, experts=64), "few-rows": dict(steps=20)}


@pytest.mark.parametrize("kw", SHAPES.values(), ids=SHAPES.keys())
def test_report_writes_every_plot(tmp_path, kw):
    run = write_metrics(tmp_path / "run", **kw)
    paths = plots.report(run)
    assert all(p.parent == run / "plots" for p in paths)
    assert_pngs(paths, MOE_PLOTS)


def test_dense_run_gets_only_the_loss_plot(tmp_path):
    run = write_metrics(tmp_path / "run", dense=True)
    assert_pngs(plots.report(run), ["loss.png"])


def test_train_rows_only(tmp_path):
    run = write_metrics(tmp_path / "run", eval_every=10**9)
    assert_pngs(plots.report(run), MOE_PLOTS)


def test_cli_report(tmp_path, capsys):
    run = write_metrics(tmp_path / "run")
    assert cli.main(["report", "--run", str(run), "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / "figs" / n) for n in MOE_PLOTS)


def test_windows_cover_every_row():
    rows = [{"step": i} for i in range(17)]
    windows = plots._windows(rows, 6)
    assert len(windows) == 6 and [r for w in windows for r in w] == rows
    assert len(plots._windows(rows[:2], 6)) == 2


BAD = {
    "missing": (None, FileNotFoundError, "no metrics file"),
    "empty": ("", ValueError, "no train or eval rows"),
    "not-json": ('{"kind": "train", "step": 1\n', ValueError, "metrics.jsonl:1 is not valid JSON"),
}


@pytest.mark.parametrize("text,exc,match", BAD.values(), ids=BAD.keys())
def test_bad_run_dir_errors(tmp_path, capsys, text, exc, match):
    if text is not None:
        (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(exc, match=match):
        plots.report(tmp_path)
    assert cli.main(["report", "--run", str(tmp_path)]) == 1
    assert re.search("dsmoe report: error: .*" + match, capsys.readouterr().out)


def test_layers_named_by_block_when_config_is_present(tmp_path):
    run = write_metrics(tmp_path / "run", layers=2)
    assert plots.layer_names(run, 2) == ["MoE layer 0", "MoE layer 1"]
    (run / "config.json").write_text(json.dumps({"model": {"first_k_dense": 1}, "train": {}}))
    assert plots.layer_names(run, 2) == ["block 1", "block 2"]
    assert_pngs(plots.report(run), MOE_PLOTS)


def stat(mean: float) -> dict:
    """A metric aggregated over two seeds, as dsmoe.studies.runner.aggregate writes it."""
    return {"mean": mean, "std": 0.05 * mean, "min": 0.95 * mean, "max": 1.05 * mean, "values": [mean, mean]}


def test_study_figures(tmp_path):
    curve = {"step": [10, 20, 30, 40], "maxvio_batch": [2.0, 1.0, 0.5, 0.3], "loss": [4.0, 3.0, 2.5, 2.2]}
    balance = [{"group": gate, "label": label, "curve": curve, "maxvio_global_mean": stat(0.2 + i),
                "val_ppl": stat(6.0 + 0.1 * i)}
               for gate in ("sigmoid", "softmax") for i, label in enumerate(["no balancing", "loss-free u=1e-3"])]
    shape = [{"group": "no shared expert", "label": f"m={m}", "m": m, "val_ppl": stat(6.5 - 0.1 * m)}
             for m in (1, 2, 4, 8)]
    shape += [{"group": "dense", "label": label, "m": 0, "val_ppl": stat(ppl)}
              for label, ppl in (("same active", 6.9), ("same total", 6.0))]
    redundancy = [{"label": name, "redundancy": [{"ratio": r, "rise": stat(r * rise)} for r in (0, 1 / 8, 1 / 4)]}
                  for name, rise in (("GShard-like", 1.0), ("DeepSeekMoE-like", 2.0))]
    lift_LKE = [[[0.0, 0.5, 1.0, 4.0], [2.0, 1.0, 1.0, 0.25], [1.0] * 4] for _ in range(2)]
    plots.plot_maxvio_curves(balance, tmp_path / "maxvio_batch.png")
    plots.plot_balance_tradeoff(balance, tmp_path / "balance_vs_ppl.png")
    plots.plot_balance_seeds(balance, tmp_path / "balance_seeds.png")
    plots.plot_shape(shape, tmp_path / "segmentation.png", "m", "m", "segmentation", log2_ticks=(1, 2, 4, 8))
    plots.plot_kind_lift(lift_LKE, ("keyword", "digit", "space"), "preset", tmp_path / "kinds.png")
    plots.plot_redundancy(redundancy, tmp_path / "redundancy.png")
    assert_pngs(list(tmp_path.glob("*.png")),
                ["maxvio_batch.png", "balance_vs_ppl.png", "balance_seeds.png", "segmentation.png", "kinds.png",
                 "redundancy.png"])

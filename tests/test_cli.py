"""The `dsmoe` command (dsmoe.cli): --help of the command and of every subcommand, an end-to-end tiny run
(train -> eval -> generate -> report, then demo and bench train) on a small corpus in a temporary
directory, and clear errors for an unknown preset or --set key."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsmoe import cli
from dsmoe.cli.bench import BENCHMARKS

pytestmark = pytest.mark.usefixtures("one_thread")

# A debug model on tiny batches: a few steps take well under a second.
TINY = ["--set", "batch_size=2", "--set", "seq_len=16", "--set", "eval_batches=1", "--set", "log_every=1",
        "--set", "tensorboard=false"]


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "debug"
    argv = ["train", "--preset", "debug", "--out", str(out), "--steps", "4", "--quiet",
            *TINY, "--set", "eval_every=2", "--set", f"data={corpus}"]
    assert cli.main(argv) == 0
    return out


def test_top_level_help_through_the_installed_entry_point():
    out = subprocess.run([sys.executable, "-m", "dsmoe", "--help"], capture_output=True, text=True, check=True).stdout
    for name in cli.COMMANDS:
        assert name in out


HELP = [[name] for name in cli.COMMANDS] + [["bench", name] for name in BENCHMARKS]


@pytest.mark.parametrize("argv", HELP, ids=[" ".join(a) for a in HELP])
def test_subcommand_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: dsmoe {' '.join(argv)}")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_writes_a_run_directory(run_dir, capsys):
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["maxvio_global"]) == 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2, 4]


@pytest.mark.slow
def test_eval(run_dir, capsys):
    assert cli.main(["eval", "--checkpoint", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("validation loss") and "perplexity" in out and "MaxVio_global per MoE layer" in out
    assert cli.main(["eval", "--checkpoint", str(run_dir), "--batches", "1", "--split", "train"]) == 0
    assert capsys.readouterr().out.startswith("training-split loss")


@pytest.mark.slow
def test_resume_with_more_steps(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert cli.main(["train", "--resume", str(copy), "--out", str(copy), "--steps", "6", "--quiet"]) == 0
    assert json.load(open(copy / "checkpoint" / "config.json"))["step"] == 6
    rows = [json.loads(line) for line in open(copy / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_generate(run_dir, capsys):
    assert cli.main(["generate", "--checkpoint", str(run_dir), "--prompt", "def f(", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def f(")


@pytest.mark.slow
def test_report(run_dir, capsys):
    assert cli.main(["report", "--run", str(run_dir)]) == 0
    paths = [Path(p) for p in capsys.readouterr().out.split()]
    assert {p.name for p in paths} >= {"loss.png", "maxvio.png", "load_final.png"}
    assert all(p.is_file() and p.parent == run_dir / "plots" for p in paths)


@pytest.mark.slow
def test_demo(corpus, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--preset", "debug", "--steps", "3", "--out", str(out), "--quiet", "--max-tokens", "8",
            *TINY, "--set", f"data={corpus}"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for expected in ("validation perplexity", "untrained model", "MaxVio_global", str(out / "checkpoint"),
                     str(out / "plots" / "loss.png"), "def fibonacci(n):"):
        assert expected in printed


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "eager-and-compiled"])
def test_bench_train(compiled, tmp_path, capsys):
    argv = ["bench", "train", "--preset", "debug", "--steps", "2", "--chunk", "1", "--warmup", "0",
            "--batch-size", "2", "--seq-len", "16", "--json", str(tmp_path / "bench.json")] + ["--compile"] * compiled
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "MoE / dense: tokens/s" in out and ("compiled / eager" in out) == compiled
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["name"], r["compiled"]) for r in results] == [("debug", False), ("debug-dense", False)] + [
        ("debug", True), ("debug-dense", True)] * compiled
    assert all(r["tokens_per_s"] > 0 for r in results)
    assert all(r["warmup_s"] > 0 for r in results if r["compiled"])  # a compiled model's warm-up compiles it


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("command", ["train", "demo"], ids=["train", "demo"])
def test_unknown_preset(command, capsys):
    assert cli.main([command, "--preset", "huge", "--out", "unused"]) == 1
    out = capsys.readouterr().out
    assert "unknown preset 'huge'" in out and "tiny" in out


def test_unknown_preset_for_bench(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "train", "--preset", "huge"])
    assert exit_.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err


def test_unknown_set_key(capsys):
    assert cli.main(["train", "--preset", "debug", "--set", "learning_rate=1", "--out", "unused"]) == 1
    out = capsys.readouterr().out
    assert "unknown --set key 'learning_rate'" in out and "moe.bias_update_speed" in out


def test_missing_checkpoint(tmp_path, capsys):
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().out


def test_bench_train_rejects_a_too_long_sequence(capsys):
    assert cli.main(["bench", "train", "--preset", "debug", "--seq-len", "999"]) == 1
    assert "--seq-len 999 exceeds the preset's max_seq_len=64" in capsys.readouterr().out


@pytest.mark.parametrize("module,argv,needed_for", [
    ("matplotlib", ["report", "--run", "RUN"], "plotting"),
    ("tokenizers", ["train", "--preset", "debug", "--steps", "2", "--quiet", *TINY, "--set", "tokenizer=bpe",
                    "--set", "data=CORPUS", "--out", "OUT"], "the BPE tokenizer (tokenizer='bpe')"),
], ids=["matplotlib", "tokenizers"])
def test_a_missing_optional_package_names_the_extra(module, argv, needed_for, run_dir, corpus, tmp_path,
                                                     monkeypatch, capsys):
    """Installed without the `cli` extra: one line that names the package and the extra, not a traceback."""
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError, as if not installed
    argv = [{"RUN": str(run_dir), "OUT": str(tmp_path / "out")}.get(a, a.replace("CORPUS", str(corpus)))
            for a in argv]
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert f"{needed_for} needs the {module} package" in out and "pip install 'dsmoe[cli]'" in out, out


def test_the_public_api_is_loaded_on_first_use():
    """`import dsmoe` imports no torch (dsmoe.prepare's workers rely on it); every name in __all__ resolves."""
    import dsmoe
    assert sorted(dsmoe.__all__) == sorted(dsmoe._EXPORTS)
    assert all(getattr(dsmoe, name) is not None for name in dsmoe.__all__)
    code = "import sys, dsmoe; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"

"""The training loop: loss goes down, exact resume after Ctrl-C, one bias update per optimizer step,
learning-rate and top-k schedules, --set parsing and its errors, NaN stop, eval/generate commands."""

import dataclasses
import json
import math

import pytest
import torch

from dsmoe import cli
from dsmoe.data import Corpus
from dsmoe.moe import MoE
from dsmoe.train import TrainConfig, TrainingDiverged, build_configs, lr_factor, top_k_at, train

# debug preset shrunk further: every run here takes about a second
FAST = ["seq_len=16", "batch_size=4", "eval_batches=2", "eval_every=0", "save_every=0", "log_every=1",
        "warmup_steps=2", "tensorboard=false"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path_factory.getbasetemp() / "dsmoe-cache"))


def run(tmp_path, *sets, name="run"):
    model_cfg, train_cfg = build_configs("debug", FAST + [f"out={tmp_path / name}", *sets])
    return train(model_cfg, train_cfg, progress=False)


def losses(run_dir):
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_debug_run_lowers_the_loss(tmp_path):
    summary = run(tmp_path, "steps=100", "seq_len=32", "batch_size=8", "log_every=10")
    curve = losses(summary["run_dir"])
    assert curve[-1] < curve[0] - 1.0
    assert summary["val_loss"] < summary["init_val_loss"] - 1.0
    for key in ("val_ppl", "init_val_ppl", "maxvio_global", "maxvio_global_mean", "maxvio_batch_mean",
                "dead_experts", "tokens_per_s", "num_params", "num_active_params", "train_loss"):
        assert key in summary
    assert len(summary["maxvio_global"]) == 1  # debug: 2 layers, the first dense
    assert json.load(open(f"{summary['run_dir']}/summary.json")) == summary


def interrupt_and_resume(tmp_path, monkeypatch, sets, owner, name, call, interrupt):
    """Train `sets` whole, then again with owner.name wrapped to call interrupt() on its call-th call (which
    must end in a KeyboardInterrupt), resume the cut run; returns (full summary, resumed summary, cut step)."""
    full = run(tmp_path, *sets, name="full")
    real, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *sets, name="cut")
    monkeypatch.setattr(owner, name, real)
    cut_step = json.load(open(tmp_path / "cut/checkpoint/config.json"))["step"]
    model_cfg, train_cfg = build_configs("debug", FAST + sets + [f"out={tmp_path / 'cut'}",
                                                                 f"resume={tmp_path / 'cut'}"])
    return full, train(model_cfg, train_cfg, progress=False), cut_step


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


@pytest.mark.parametrize("grad_accum", [1, 3], ids=["accum1", "accum3"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, grad_accum):
    sets = ["steps=8", f"grad_accum={grad_accum}", "moe.bias_update_speed=0.01"]
    # Ctrl-C in the middle of step 5's micro-batches
    full, resumed, cut_step = interrupt_and_resume(tmp_path, monkeypatch, sets, Corpus, "batch",
                                                   5 * grad_accum + 1 + (grad_accum > 1), _raise_keyboard_interrupt)
    assert cut_step == 5
    assert losses(resumed["run_dir"]) == losses(full["run_dir"])  # bit-exact, every step
    assert resumed["val_loss"] == full["val_loss"]
    biases = [torch.load(tmp_path / d / "checkpoint" / "state.pt", weights_only=True)["step"] for d in ("full", "cut")]
    assert biases == [8, 8]


def test_ctrl_c_during_the_update_checkpoints_the_updated_step(tmp_path, monkeypatch):
    """A Ctrl-C (a real SIGINT) that lands between the optimizer step and the step counter is held until both
    are done, so the checkpoint's step number matches its weights and the resumed run equals the uninterrupted
    one."""
    import os
    import signal

    from dsmoe.model import MoETransformer

    # the 5th bias update comes after step 5's optimizer step, before its step count
    full, resumed, cut_step = interrupt_and_resume(tmp_path, monkeypatch, ["steps=8", "moe.bias_update_speed=0.01"],
                                                   MoETransformer, "update_biases", 5,
                                                   lambda: os.kill(os.getpid(), signal.SIGINT))
    assert cut_step == 5
    assert losses(resumed["run_dir"]) == losses(full["run_dir"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_ctrl_c_hold_leaves_other_handlers_alone():
    """An ignored SIGINT stays ignored inside the hold (no KeyboardInterrupt appears from nowhere)."""
    import os
    import signal

    from dsmoe.train import _ctrl_c_held

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("grad_accum", [1, 2, 4], ids=["accum1", "accum2", "accum4"])
def test_bias_updates_once_per_optimizer_step(tmp_path, monkeypatch, grad_accum):
    updates, counted = [], []
    real_update = MoE.update_bias

    def spy(self, group=None):
        counted.append(int(self.counts.sum()))
        before = self.gate.bias.clone()
        real_update(self, group)
        updates.append(not torch.equal(before, self.gate.bias))

    monkeypatch.setattr(MoE, "update_bias", spy)
    run(tmp_path, "steps=5", f"grad_accum={grad_accum}")
    assert len(updates) == 5 and all(updates)  # one call per optimizer step per MoE layer, each moving b
    tokens_per_step = 4 * 16 * grad_accum * 2  # batch * seq * micro-batches * top_k
    assert counted == [tokens_per_step] * 5  # every micro-batch counted, evaluation never


def test_aux_loss_scaled_like_main_loss(tmp_path):
    summary = run(tmp_path, "steps=3", "grad_accum=2", "moe.aux_loss_alpha=0.01", "moe.score_func=softmax")
    rows = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    aux = [r["aux_loss"] for r in rows if r["kind"] == "train"]
    assert all(0.005 < a < 0.05 for a in aux)  # ~alpha under near-uniform routing, not alpha * grad_accum


def test_nan_loss_stops_with_clear_error(tmp_path, monkeypatch):
    from dsmoe.model import MoETransformer
    real_forward = MoETransformer.forward

    def nan_forward(self, idx, targets=None, cache=None):
        logits, loss = real_forward(self, idx, targets, cache)
        return logits, (loss * float("nan") if loss is not None and self.training else loss)

    monkeypatch.setattr(MoETransformer, "forward", nan_forward)
    with pytest.raises(TrainingDiverged, match="nan.*No checkpoint had been written yet"):
        run(tmp_path, "steps=3")
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_resume_takes_the_new_optimizer_settings(tmp_path, monkeypatch):
    """--set lr / weight_decay / beta2 on resume change the optimizer, not only the saved config."""
    import dsmoe.train as train_mod
    run(tmp_path, "steps=4")
    built = []
    real = train_mod.build_optimizer
    monkeypatch.setattr(train_mod, "build_optimizer", lambda model, cfg: built.append(real(model, cfg)) or built[-1])
    model_cfg, train_cfg = build_configs("debug", FAST + [f"out={tmp_path / 'run'}", "steps=6", "lr=1e-4",
                                                          "min_lr=1e-5", "weight_decay=0", "beta2=0.99"])
    train(model_cfg, dataclasses.replace(train_cfg, resume=str(tmp_path / "run")), progress=False)
    group = built[0].param_groups[0]
    assert group["weight_decay"] == 0 and group["betas"][1] == 0.99
    assert group["lr"] == pytest.approx(1e-4 * train_mod.lr_factor(6, train_cfg))


def test_resume_with_a_broken_config_is_clear(tmp_path, capsys):
    run(tmp_path, "steps=2")
    (tmp_path / "run" / "checkpoint" / "config.json").write_text(json.dumps({"model": {"bogus": 1}}))
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 1
    assert "not a valid config" in capsys.readouterr().out


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    values = [lr_factor(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_dynamic_top_k_anneals_to_final():
    cfg = TrainConfig(topk_start=6, topk_anneal_steps=10)
    assert [top_k_at(s, cfg, 2) for s in (0, 5, 10, 50)] == [6, 4, 2, 2]
    assert top_k_at(0, TrainConfig(), 2) == 2


def test_dynamic_top_k_in_training(tmp_path):
    summary = run(tmp_path, "steps=4", "topk_start=4", "topk_anneal_steps=4")
    rows = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    assert [r["top_k"] for r in rows if r["kind"] == "train"] == [4, 4, 3, 2]


@pytest.mark.parametrize("sets,field,value", [
    (["lr=0.01"], ("train", "lr"), 0.01),
    (["n_layers=3"], ("model", "n_layers"), 3),
    (["moe.aux_loss_alpha=0.01"], ("moe", "aux_loss_alpha"), 0.01),
    (["moe.score_func=softmax"], ("moe", "score_func"), "softmax"),
    (["data=none"], ("train", "data"), None),
    (["tie_embeddings=false"], ("model", "tie_embeddings"), False),
], ids=["train-field", "model-field", "moe-float", "moe-enum", "none", "bool"])
def test_set_overrides(sets, field, value):
    model_cfg, train_cfg = build_configs("debug", sets)
    obj = {"train": train_cfg, "model": model_cfg, "moe": model_cfg.moe}[field[0]]
    assert getattr(obj, field[1]) == value


@pytest.mark.parametrize("preset,sets,match", [
    ("nope", [], "unknown preset 'nope'; choose one of"),
    ("debug", ["bogus=1"], "unknown --set key 'bogus'; allowed keys:.*moe.top_k"),
    ("debug", ["moe.bogus=1"], "unknown --set key 'moe.bogus'"),
    ("debug", ["lr"], "must look like key=value"),
    ("debug", ["steps=abc"], "--set steps"),
    ("debug", ["moe.score_func=tanh"], "score_func='tanh' is not allowed"),
    ("debug-dense", ["moe.top_k=2"], "no MoE layers"),
], ids=["preset", "key", "moe-key", "no-equals", "bad-int", "bad-enum", "dense-moe"])
def test_config_errors_are_clear(preset, sets, match):
    with pytest.raises(ValueError, match=match):
        build_configs(preset, sets)


def test_cli_train_eval_generate(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--preset", "debug", "--out", str(out), "--steps", "6", "--quiet"] + sum((["--set", s] for s in FAST), [])
    assert cli.main(["train", *args]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert cli.main(["eval", "--checkpoint", str(out), "--batches", "2"]) == 0
    text = capsys.readouterr().out
    assert "MaxVio_global per MoE layer" in text and text.startswith("validation loss")
    assert cli.main(["eval", "--checkpoint", str(out), "--batches", "2", "--split", "train"]) == 0
    assert capsys.readouterr().out.startswith("training-split loss")
    assert cli.main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-tokens", "10"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    # resume from the run directory with more steps
    assert cli.main(["train", "--resume", str(out), "--steps", "8", "--quiet"]) == 0
    assert json.load(open(out / "checkpoint" / "config.json"))["step"] == 8


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["train", "--preset", "nope"]) == 1
    assert "unknown preset" in capsys.readouterr().out
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 1
    assert "no checkpoint at" in capsys.readouterr().out
    (tmp_path / "empty.txt").write_text("")
    assert cli.main(["train", "--preset", "debug", "--set", f"data={tmp_path / 'empty.txt'}", "--quiet"]) == 1
    assert "empty or unreadable" in capsys.readouterr().out
    assert cli.main(["train", "--preset", "debug", "--data", str(tmp_path / "empty.txt"), "--quiet"]) == 1
    assert "empty or unreadable" in capsys.readouterr().out


def test_perplexity_is_exp_loss(tmp_path):
    summary = run(tmp_path, "steps=2")
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))

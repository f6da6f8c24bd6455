"""Runs and checkpoints that survive faults, tried as a careful user would: a diverged run never saves (or
calls good) non-finite weights; a crash between a save's two renames leaves a resumable run; a full disk is
a clear error that keeps the previous checkpoint and cleans up after itself; a torn metrics line does not
block a resume; two trainings never write one run folder and a new run never empties an old one; a resume
past its steps, of a finished run or with another preset is refused; optimizer state that does not fit and
flipped bits in the weights are clear errors."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dsmoe import checkpoint
from dsmoe.checkpoint import CheckpointError
from dsmoe.presets import build_configs
from dsmoe.runtime import RunLock
from dsmoe.train import TrainingDiverged, train

FAST = ["seq_len=16", "batch_size=4", "eval_batches=2", "eval_every=0", "log_every=1", "warmup_steps=2",
        "tensorboard=false", "save_every=2"]

pytestmark = pytest.mark.slow  # every case trains a few steps


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path_factory.getbasetemp() / "dsmoe-cache"))


def run(out, *sets):
    return train(*build_configs("debug", FAST + [f"out={out}", *sets]), progress=False)


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(f"{run_dir}/metrics.jsonl")) if r["kind"] == "train"]


def test_diverged_run_names_a_good_checkpoint(tmp_path):
    """lr 100 from step 0: the weights turn non-finite between log points; the message names a checkpoint
    that exists, is at the step it says, and holds finite weights (or says none was written)."""
    with pytest.raises(TrainingDiverged) as err:
        run(tmp_path / "run", "lr=100", "min_lr=100", "warmup_steps=0", "steps=40", "log_every=4", "save_every=2")
    message = str(err.value)
    if "No checkpoint had been written" in message:
        assert not (tmp_path / "run" / "checkpoint").exists()
        return
    step = int(message.split("(step ")[1].split(")")[0])
    saved = tmp_path / "run" / "checkpoint"
    assert json.loads((saved / "config.json").read_text())["step"] == step
    assert all(torch.isfinite(t).all() for t in load_file(str(saved / "model.safetensors")).values())


def test_crash_between_the_renames_resumes_from_the_old_checkpoint(tmp_path):
    full = run(tmp_path / "full", "steps=4")
    run(tmp_path / "cut", "steps=2")
    os.replace(tmp_path / "cut" / "checkpoint", tmp_path / "cut" / "checkpoint.old")  # killed mid-swap
    assert checkpoint.resolve(tmp_path / "cut") == tmp_path / "cut" / "checkpoint.old"
    resumed = run(tmp_path / "cut", "steps=4", f"resume={tmp_path / 'cut'}")
    assert losses(resumed["run_dir"]) == losses(full["run_dir"])


def test_full_disk_keeps_the_previous_checkpoint_and_cleans_up(tmp_path, monkeypatch):
    calls = []
    real = checkpoint.save_file

    def full_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_on_second)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is kept.*disk full"):
        run(tmp_path / "run", "steps=6")
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert [p.name for p in (tmp_path / "run").glob(".checkpoint.tmp*")] == []  # nothing left to fill the disk
    assert json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["step"] == 2
    checkpoint.load_checkpoint(tmp_path / "run")  # the kept one is whole


def test_a_crashed_saves_temporary_folder_is_removed(tmp_path):
    stale = tmp_path / "run" / ".checkpoint.tmp999999999"  # a pid that cannot be running
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")
    run(tmp_path / "run", "steps=2", "overwrite=true")
    assert not stale.exists()


def test_torn_metrics_line_does_not_block_resume(tmp_path):
    full = run(tmp_path / "full", "steps=4")
    run(tmp_path / "cut", "steps=2")
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # the disk filled up mid-row
    resumed = run(tmp_path / "cut", "steps=4", f"resume={tmp_path / 'cut'}")
    assert losses(resumed["run_dir"]) == losses(full["run_dir"])


def test_two_trainings_never_share_a_folder(tmp_path):
    (tmp_path / "run").mkdir()
    lock = RunLock(tmp_path / "run")  # another training holds it
    try:
        with pytest.raises(ValueError, match="another training is writing to"):
            run(tmp_path / "run", "steps=2")
    finally:
        lock.release()
    run(tmp_path / "run", "steps=2")
    with pytest.raises(ValueError, match="already holds a run.*--resume.*overwrite=true"):
        run(tmp_path / "run", "steps=2")
    assert len(losses(tmp_path / "run")) == 2  # the first run's metrics are intact
    run(tmp_path / "run", "steps=3", "overwrite=true")
    assert len(losses(tmp_path / "run")) == 3


def test_resume_past_its_steps_or_finished_is_refused(tmp_path):
    run(tmp_path / "run", "steps=4")
    with pytest.raises(ValueError, match="at step 4: past steps=2; give --steps above 4"):
        run(tmp_path / "run", "steps=2", f"resume={tmp_path / 'run'}")
    with pytest.raises(ValueError, match="at step 4: the run is finished"):
        run(tmp_path / "run", "steps=4", f"resume={tmp_path / 'run'}")
    assert len(losses(tmp_path / "run")) == 4  # no duplicate rows


def test_cli_resume_of_a_copy_writes_into_the_copy_and_refuses_a_preset(tmp_path, capsys):
    from dsmoe.cli import main

    run(tmp_path / "run", "steps=2")
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    assert main(["train", "--resume", str(tmp_path / "copy"), "--steps", "3", "--quiet"]) == 0
    assert f"into {tmp_path / 'copy'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "copy" / "checkpoint" / "config.json").read_text())["step"] == 3
    assert json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["step"] == 2  # untouched
    assert main(["train", "--resume", str(tmp_path / "copy"), "--preset", "tiny", "--steps", "4"]) == 1
    assert "drop --preset" in capsys.readouterr().out


def test_optimizer_state_of_another_model_is_refused(tmp_path):
    run(tmp_path / "run", "steps=2")
    path = tmp_path / "run" / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="state.pt is corrupt or missing"):  # changed after it was written
        run(tmp_path / "run", "steps=4", f"resume={tmp_path / 'run'}")
    _record_checksum(path)  # a state.pt written so, by another model's run
    with pytest.raises(ValueError, match=r"optimizer exp_avg of parameter 0 has shape \(3, 3\)"):
        run(tmp_path / "run", "steps=4", f"resume={tmp_path / 'run'}")


def _record_checksum(path):
    """Record `path`'s SHA-256 in its checkpoint's config.json, as if the checkpoint had been written with it."""
    config_path = path.parent / "config.json"
    config = json.loads(config_path.read_text())
    config["files_sha256"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    config_path.write_text(json.dumps(config))


def test_weights_with_a_nan_are_never_resumed_or_evaluated(tmp_path):
    """A checkpoint whose weights hold a NaN (with a consistent checksum: written so) is refused by resume and
    eval alike, naming the tensor; it is never trained on and later called the last good checkpoint."""
    from safetensors.torch import save_file

    run(tmp_path / "run", "steps=2")
    path = tmp_path / "run" / "checkpoint" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["norm.weight"][3] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    _record_checksum(path)
    with pytest.raises(CheckpointError, match="'norm.weight' holds NaN"):
        run(tmp_path / "run", "steps=4", f"resume={tmp_path / 'run'}")
    with pytest.raises(CheckpointError, match="'norm.weight' holds NaN"):
        checkpoint.load_checkpoint(tmp_path / "run")


def test_every_file_of_a_checkpoint_is_checksummed(tmp_path):
    run(tmp_path / "run", "steps=2")
    ckpt = tmp_path / "run" / "checkpoint"
    recorded = json.loads((ckpt / "config.json").read_text())["files_sha256"]
    assert set(recorded) == {f.name for f in ckpt.iterdir() if f.name != "config.json"}
    (ckpt / "tokenizer.json").write_text('{"kind": "byte"} ')
    with pytest.raises(CheckpointError, match="tokenizer.json is corrupt or missing"):
        checkpoint.load_checkpoint(tmp_path / "run")


def test_flipped_bits_in_the_weights_are_caught(tmp_path):
    run(tmp_path / "run", "steps=2")
    path = tmp_path / "run" / "checkpoint" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # one bit of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt.*SHA-256"):
        checkpoint.load_checkpoint(tmp_path / "run")


@pytest.mark.parametrize("sets,message", [
    (["expert_parallel=3"], "--expert-parallel 3 must divide the 4 processes.*choose one of 1, 2, 4"),
    (["batch_size=6"], "batch_size=6 .* divisible by the 4 processes")])
def test_a_bad_layout_fails_before_any_process_group(sets, message, tmp_path, monkeypatch):
    """torchrun's 4 processes with an expert-parallel degree or a batch they cannot share: a clear error on every
    rank before any collective (no rank left waiting for the others)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "run", "steps=2", *sets)


def test_one_process_cannot_take_expert_parallel_and_says_how_to_resume(tmp_path):
    with pytest.raises(ValueError, match="launch with `torchrun --nproc_per_node 2.*resumes in one process with "
                                         "--expert-parallel 1"):
        run(tmp_path / "run", "steps=2", "expert_parallel=2")


@pytest.mark.parametrize("saved,world,taken", [(2, 1, 0), (2, 4, 2), (4, 2, 2), (4, 6, 2), (0, 4, 0), (3, 4, 0)])
def test_a_resume_takes_a_layout_that_this_launch_can_hold(saved, world, taken):
    from dsmoe.parallel.context import layout_for_launch
    assert layout_for_launch(saved, world) == taken


def test_a_stop_during_the_last_interval_finishes_the_run(tmp_path, monkeypatch):
    """Ctrl-C in the last step: the run ends as finished (summary, final evaluation), not as a checkpoint that
    a resume would then refuse as finished."""
    import signal

    from dsmoe.data import Corpus

    real, calls = Corpus.sample, []

    def batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(Corpus, "sample", batch)
    summary = run(tmp_path / "run", "steps=3")
    assert summary["steps"] == 3 and (tmp_path / "run" / "summary.json").exists()


def test_checkpoint_from_before_new_config_fields_resumes(tmp_path):
    """A checkpoint whose config.json predates fields added since (they take their defaults) still resumes."""
    run(tmp_path / "run", "steps=2")
    path = tmp_path / "run" / "checkpoint" / "config.json"
    config = json.loads(path.read_text())
    for key in ("kv_lora_rank", "mtp_layers", "rope_scaling"):
        config["model"].pop(key)
    config["train"].pop("init")
    path.write_text(json.dumps(config))
    run(tmp_path / "run", "steps=3", f"resume={tmp_path / 'run'}")
    assert len(losses(tmp_path / "run")) == 3


def test_a_model_hf_cannot_hold_still_finishes(tmp_path, capsys):
    """An MLA model whose routing the DeepSeek format cannot express (sigmoid scores with max group scores):
    the run succeeds, keeps its dsmoe checkpoint, and says why there is no RUN/hf."""
    mla = ["kv_lora_rank=16", "qk_nope_head_dim=8", "qk_rope_head_dim=8", "v_head_dim=8", "moe.n_groups=4",
           "moe.topk_groups=2", "moe.group_score=max"]
    summary = run(tmp_path / "run", "steps=2", *mla)
    assert summary["steps"] == 2 and not (tmp_path / "run" / "hf").exists()
    assert "no HuggingFace folder written (group_score='max'" in capsys.readouterr().out


def test_run_configs_resolve_a_resume_for_library_callers_too(tmp_path):
    """dsmoe.train.run_configs holds the command line's policy: a resumed run keeps its own configs in its own
    folder wherever it was moved, on this launch's layout (a dp x ep checkpoint resumes in one process)."""
    from dsmoe.train import run_configs

    run(tmp_path / "run", "steps=2")
    config_path = tmp_path / "run" / "checkpoint" / "config.json"
    config = json.loads(config_path.read_text())
    config["train"]["expert_parallel"] = 2  # as a dp 2 x ep 2 launch saves it
    config_path.write_text(json.dumps(config))
    shutil.move(tmp_path / "run", tmp_path / "moved")
    model_cfg, train_cfg, notes = run_configs(resume=str(tmp_path / "moved"), sets=["steps=4"])
    assert train_cfg.out == str(tmp_path / "moved") and train_cfg.steps == 4 and train_cfg.expert_parallel == 0
    assert "expert_parallel=0 instead of the checkpoint's 2" in notes[0]
    assert run_configs(resume=str(tmp_path / "moved"), sets=["expert_parallel=2"])[1].expert_parallel == 2
    with pytest.raises(ValueError, match="drop --preset/--init"):
        run_configs(preset="debug", resume=str(tmp_path / "moved"))

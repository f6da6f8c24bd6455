"""Checkpoints: every tensor (balancing biases included) survives a round trip, tied embeddings, atomic
writes, and clear errors for missing, corrupt or mismatched checkpoints."""

import json

import pytest
import torch

from dsmoe import checkpoint
from dsmoe.checkpoint import CheckpointError, load_checkpoint
from dsmoe.config import TrainConfig
from dsmoe.model import MoETransformer
from dsmoe.presets import preset
from dsmoe.tokenizer import ByteTokenizer


def make_model(tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = preset("debug")
    cfg.tie_embeddings = tie
    model = MoETransformer(cfg)
    for m in model.moe_layers():  # nonzero balancing biases, as after training
        m.gate.bias.copy_(torch.randn_like(m.gate.bias))
    return model


def save(model, path):
    config = {"model": model.cfg.to_dict(), "train": TrainConfig(preset="debug").to_dict(), "step": 3}
    return checkpoint.save(path, model, config, {"step": 3}, ByteTokenizer())


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_round_trip_every_tensor(tmp_path, tie):
    model = make_model(tie)
    save(model, tmp_path / "ckpt")
    loaded, model_cfg, train_cfg, tok = load_checkpoint(tmp_path / "ckpt")
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    biases = [k for k in got if k.endswith("gate.bias")]
    assert biases and all(got[k].dtype == torch.float32 and got[k].abs().sum() > 0 for k in biases)
    assert (loaded.head.weight is loaded.embed.weight) == tie
    assert model_cfg == model.cfg and train_cfg.preset == "debug" and tok.kind == "byte"


def test_save_is_atomic_and_replaces(tmp_path):
    save(make_model(seed=0), tmp_path / "ckpt")
    second = make_model(seed=1)
    save(second, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or .old directory left
    loaded = load_checkpoint(tmp_path / "ckpt")[0]
    assert torch.equal(loaded.embed.weight, second.embed.weight)


def test_run_directory_resolves_to_its_checkpoint(tmp_path):
    save(make_model(), tmp_path / "run" / "checkpoint")
    assert checkpoint.resolve(tmp_path / "run") == tmp_path / "run" / "checkpoint"


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("damage,match", [
    ("truncate-weights", "model.safetensors is corrupt"),
    ("garble-config", "config.json is corrupt"),
    ("delete-weights", "model.safetensors is missing"),
    ("bad-config-field", "not a valid config"),
    ("truncate-state", "state.pt is corrupt"),
], ids=["truncated-weights", "garbled-config", "missing-weights", "bad-config-field", "truncated-state"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage, match):
    path = tmp_path / "ckpt"
    save(make_model(), path)
    if damage == "truncate-weights":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garble-config":
        (path / "config.json").write_text("{not json")
    elif damage == "delete-weights":
        (path / "model.safetensors").unlink()
    elif damage == "bad-config-field":
        config = json.loads((path / "config.json").read_text())
        config["model"]["dimension"] = 3
        (path / "config.json").write_text(json.dumps(config))
    elif damage == "truncate-state":
        (path / "state.pt").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(CheckpointError, match=match):
        if damage == "truncate-state":
            checkpoint.load_state(path)
        else:
            load_checkpoint(path)


def test_mismatched_config_names_the_tensors(tmp_path):
    path = tmp_path / "ckpt"
    save(make_model(), path)
    config = json.loads((path / "config.json").read_text())
    config["model"]["moe"]["n_routed_experts"] = 8
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match the model config.*experts"):
        load_checkpoint(path)


@pytest.mark.slow
def test_resume_with_another_model_config_is_refused(tmp_path):
    from dsmoe.presets import build_configs
    from dsmoe.train import train
    path = tmp_path / "run"
    save(make_model(), path / "checkpoint")
    model_cfg, train_cfg = build_configs("debug", ["n_layers=3", f"resume={path}", f"out={path}"])
    with pytest.raises(CheckpointError, match="another model config: n_layers: checkpoint 2 vs requested 3"):
        train(model_cfg, train_cfg, progress=False)

"""Hostile inputs (the adversarial user's findings), each class closed where it enters:

- paths: a HuggingFace folder's index or links may point outside it (`../../x`, `/abs`, a link out); dsmoe
  refuses before opening anything, naming the entry, with the same words whether the outside path exists;
  huggingface_hub's snapshot -> blobs links still load;
- non-finite weights: a NaN or inf in any tensor of a folder is an error naming the key and the file;
- config.json values: every field dsmoe reads is checked by type and range, naming the HF field (260.7 for an
  int, 0 for rope_theta, "false" for a bool), never truncated or replaced by a default;
- sizes: a config claiming 10**9 experts, 10**6 layers or 10**12 positions is refused before anything is
  built or allocated; a real DeepSeek-V3 config still reads and builds on the meta device;
- the library API: MoETransformer.forward / generate and from_pretrained refuse bad arguments (float, empty,
  out-of-vocabulary ids, a negative length, a NaN temperature, an unknown dtype or device) naming them.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsmoe import pretrained
from dsmoe.checkpoint import is_hf_folder
from dsmoe.config import ModelConfig, MoEConfig
from dsmoe.model import MoETransformer
from dsmoe.paths import FolderPathError
from dsmoe.pretrained import PretrainedError, from_pretrained, load_hf_weights, model_config_from_hf

transformers = pytest.importorskip("transformers", minversion="5.0")
from test_pretrained import CASES, hf_model  # noqa: E402  (needs transformers)

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny V3 folder (one file) and one sharded, saved once; tests work on copies."""
    root = tmp_path_factory.mktemp("saved")
    model = hf_model(*CASES["v3-no-qlora"])
    model.save_pretrained(root / "one")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root


@pytest.fixture
def folder(saved, tmp_path):
    shutil.copytree(saved / "one", tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture
def sharded(saved, tmp_path):
    shutil.copytree(saved / "sharded", tmp_path / "hf")
    return tmp_path / "hf"


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(cfg))


# ----------------------------------------------------------------------------- paths out of the folder


def _point_index_at(folder: Path, name: str) -> None:
    index = json.loads((folder / INDEX).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = name
    (folder / INDEX).write_text(json.dumps(index))


ESCAPES = {
    "dotdot": lambda f, target: _point_index_at(f, os.path.relpath(target, f)),
    "absolute": lambda f, target: _point_index_at(f, str(target)),
    "dotdot-inside-name": lambda f, target: _point_index_at(f, "sub/../../" + target.name),
    "shard-link-out": lambda f, target: _link(f / sorted(f.glob("model-*"))[0].name, target),
    "index-link-out": lambda f, target: _link(f / INDEX, target),
    "config-link-out": lambda f, target: _link(f / "config.json", target),
}


def _link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


@pytest.mark.parametrize("escape", ESCAPES.values(), ids=ESCAPES.keys())
def test_paths_out_of_the_folder_are_refused_alike(sharded, tmp_path, escape):
    """The error names the entry, and is the same whether the outside file exists or not: no probing."""
    outside = tmp_path / "secret.safetensors"
    save_file({"x": torch.zeros(2)}, str(outside))
    messages = []
    for target in (outside, tmp_path / "absent.safetensors"):
        copy = tmp_path / f"copy-{target.stem}"
        shutil.copytree(sharded, copy, symlinks=True)
        escape(copy, target)
        with pytest.raises(FolderPathError, match="leads outside the folder") as info:
            from_pretrained(copy)
        messages.append(str(info.value).replace(str(copy), "FOLDER").replace(target.stem, "NAME"))
    assert messages[0] == messages[1]
    assert "exist" not in messages[0] and "missing" not in messages[0]


def test_index_entry_is_named(sharded):
    _point_index_at(sharded, "../../x.safetensors")
    with pytest.raises(FolderPathError, match=r"model.safetensors.index.json entry '.*': '../../x.safetensors'"):
        from_pretrained(sharded)


def test_a_link_out_is_refused_by_inspect(folder, tmp_path):
    (tmp_path / "elsewhere.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    _link(folder / "config.json", tmp_path / "elsewhere.json")
    with pytest.raises(FolderPathError):
        is_hf_folder(folder)


def test_links_inside_the_folder_and_hub_cache_blobs_load(saved, tmp_path):
    """huggingface_hub's cache: REPO/snapshots/REV/* are links to REPO/blobs/*; a link inside a folder is fine."""
    repo = tmp_path / "models--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted((saved / "one").iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    assert from_pretrained(snapshot).cfg.n_layers == 3
    inside = tmp_path / "inside"
    shutil.copytree(saved / "one", inside)
    (inside / "real").mkdir()
    (inside / "model.safetensors").rename(inside / "real" / "weights.safetensors")
    (inside / "model.safetensors").symlink_to(Path("real", "weights.safetensors"))
    assert from_pretrained(inside).cfg.n_layers == 3


def test_index_entry_that_is_not_a_name(sharded):
    _point_index_at(sharded, 7)
    with pytest.raises(PretrainedError, match=r"weight_map\['.*'\] = 7 is invalid"):
        from_pretrained(sharded)


# ----------------------------------------------------------------------------- non-finite weights


NON_FINITE = {
    "nan-final-norm": ("model.norm.weight", float("nan"), torch.float32),
    "inf-head": ("lm_head.weight", float("inf"), torch.float32),
    "nan-bias-bf16": ("model.layers.1.mlp.gate.e_score_correction_bias", float("nan"), torch.bfloat16),
}


@pytest.mark.parametrize("key,value,dtype", NON_FINITE.values(), ids=NON_FINITE.keys())
def test_non_finite_weight_names_key_and_file(folder, key, value, dtype):
    sd = {k: t.to(dtype) for k, t in load_file(str(folder / "model.safetensors")).items()}
    sd[key].view(-1)[-1] = value
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PretrainedError, match=rf"model.safetensors: tensor {key} holds 1 non-finite value"):
        from_pretrained(folder)
    model = from_pretrained(folder, device="meta")  # shapes only: nothing read, nothing to check
    with pytest.raises(PretrainedError, match=key):  # training's --init path
        load_hf_weights(MoETransformer(model.cfg).to(dtype), folder)


def test_non_finite_weight_in_a_shard_names_the_shard(sharded):
    shard = sorted(sharded.glob("model-*"))[-1]
    sd = load_file(str(shard))
    key = next(iter(sd))
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, str(shard), metadata={"format": "pt"})
    with pytest.raises(PretrainedError, match=rf"{shard.name}: tensor {key}"):
        from_pretrained(sharded)


# ----------------------------------------------------------------------------- config.json values

GOOD = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, first_k_dense_replace=1, max_position_embeddings=64, n_shared_experts=1,
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, rope_theta=10000.0, hidden_act="silu")
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
BAD_CONFIG = {
    "vocab-fraction": (dict(vocab_size=260.7), "vocab_size=260.7"),
    "vocab-zero": (dict(vocab_size=0), "vocab_size=0"),
    "layers-str": (dict(num_hidden_layers="3"), "num_hidden_layers='3'"),
    "heads-bool": (dict(num_attention_heads=True), "num_attention_heads=True"),
    "positions-zero": (dict(max_position_embeddings=0), "max_position_embeddings=0"),
    "positions-fraction": (dict(max_position_embeddings=64.5), "max_position_embeddings=64.5"),
    "rope-theta-zero": (dict(rope_theta=0), "rope_theta=0"),
    "rope-theta-inf": (dict(rope_theta=float("inf")), "rope_theta=inf"),
    "rope-theta-nested-zero": (dict(rope_theta=None, rope_parameters={"rope_theta": 0, "rope_type": "default"}),
                               "rope_theta=0"),
    "eps-zero": (dict(rms_norm_eps=0), "rms_norm_eps=0"),
    "eps-nan": (dict(rms_norm_eps=float("nan")), "rms_norm_eps=nan"),
    "tie-str": (dict(tie_word_embeddings="false"), "tie_word_embeddings='false'"),
    "interleave-int": (dict(rope_interleave=0), "rope_interleave=0"),
    "dense-too-many": (dict(first_k_dense_replace=4), "first_k_dense_replace=4"),
    "dense-negative": (dict(first_k_dense_replace=-1), "first_k_dense_replace=-1"),
    "rope-dim-odd": (dict(qk_rope_head_dim=3), "qk_rope_head_dim=3"),
    "v-dim-zero": (dict(v_head_dim=0), "v_head_dim=0"),
    "q-lora-fraction": (dict(q_lora_rank=8.5), "q_lora_rank=8.5"),
    "mtp-negative": (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers=-1"),
    "intermediate-missing": (dict(intermediate_size=None), "intermediate_size"),
    "experts-fraction": (dict(n_routed_experts=8.5), "n_routed_experts=8.5"),
    "experts-zero": (dict(n_routed_experts=0), "n_routed_experts=0"),
    "scale-zero": (dict(routed_scaling_factor=0), "routed_scaling_factor=0"),
    "alpha-empty": (dict(aux_loss_alpha=""), "aux_loss_alpha=''"),
    "alpha-negative": (dict(aux_loss_alpha=-0.1), "aux_loss_alpha=-0.1"),
    "alpha-huge-int": (dict(aux_loss_alpha=10**400), "aux_loss_alpha="),
    "scaling-list": (dict(rope_scaling=["yarn"]), "rope_scaling=['yarn']"),
    "yarn-factor-zero": (dict(rope_scaling=YARN | {"factor": 0}), "rope_scaling.factor=0"),
    "yarn-original-fraction": (dict(rope_scaling=YARN | {"original_max_position_embeddings": 16.5}),
                               "rope_scaling.original_max_position_embeddings=16.5"),
    "yarn-beta-zero": (dict(rope_scaling=YARN | {"beta_fast": 0}), "rope_scaling.beta_fast=0"),
    "yarn-mscale-negative": (dict(rope_scaling=YARN | {"mscale": -1}), "rope_scaling.mscale=-1"),
    "yarn-theta-one": (dict(rope_theta=1, rope_scaling=YARN), "rope_theta=1.0"),
}


@pytest.mark.parametrize("changes,words", BAD_CONFIG.values(), ids=BAD_CONFIG.keys())
def test_config_field_refused_by_name(changes, words):
    with pytest.raises(ValueError) as info:
        model_config_from_hf(GOOD | changes)
    assert words in str(info.value)


def test_integral_floats_are_integers_and_absent_fields_take_defaults():
    cfg = model_config_from_hf(GOOD | dict(vocab_size=64.0, num_hidden_layers=3.0, max_position_embeddings=None))
    assert cfg.vocab_size == 64 and isinstance(cfg.vocab_size, int) and isinstance(cfg.n_layers, int)
    assert cfg.max_seq_len == 4096  # absent or null only: 0 is an error (above)


def test_bad_field_in_a_folder_names_the_file(folder):
    _edit_config(folder, vocab_size=260.7)
    with pytest.raises(PretrainedError, match=r"config.json: HF config field vocab_size=260.7 is invalid"):
        from_pretrained(folder)


# ----------------------------------------------------------------------------- sizes against the machine

# DeepSeek-V3's released config.json (the fields dsmoe reads)
V3 = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
          moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
          n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
          qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8, topk_group=4,
          num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=3, norm_topk_prob=True,
          scoring_func="sigmoid", max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
          rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                        "original_max_position_embeddings": 4096, "type": "yarn"},
          tie_word_embeddings=False, num_nextn_predict_layers=1, hidden_act="silu", attention_bias=False)


@pytest.fixture
def memory(monkeypatch):
    """Pretend this machine has `memory.available` bytes free (None: unknown)."""
    class Memory:
        available: int | None = 8 * 2**30

    monkeypatch.setattr(pretrained, "available_memory", lambda device: Memory.available)
    return Memory


def test_real_v3_config_reads_and_builds_on_meta(memory):
    cfg = model_config_from_hf(V3)
    assert 670e9 < cfg.num_params(mtp=False) < 672e9  # DeepSeek-V3's published 671B (685B with the MTP module)
    pretrained._check_rotary(cfg)  # 163,840 positions: ~170 MB, fits
    with torch.device("meta"):
        model = MoETransformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


HUGE = {
    "experts-1e9": (dict(n_routed_experts=10**9), "describes"),
    "layers-1e6": (dict(num_hidden_layers=10**6), "describes"),
    "vocab-1e12": (dict(vocab_size=10**12), "describes"),
    "positions-1e12": (dict(max_position_embeddings=10**12), "max_position_embeddings=1,000,000,000,000"),
}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("changes,words", HUGE.values(), ids=HUGE.keys())
def test_huge_config_refused_before_anything_is_built(folder, memory, changes, words, device):
    _edit_config(folder, **changes)
    with pytest.raises(PretrainedError, match=words):
        from_pretrained(folder, device=device)


def test_weights_larger_than_memory_are_refused_except_on_meta(folder, memory):
    memory.available = 100_000  # bytes: the tiny model's ~200 kB of fp32 weights do not fit
    with pytest.raises(PretrainedError, match=r"parameters \(vocab_size=64, hidden_size=32, num_hidden_layers=3, "
                                              r"n_routed_experts=8.*cpu has 0.1 MiB available"):
        from_pretrained(folder)
    model = from_pretrained(folder, device="meta")  # allocates nothing: allowed
    assert model.embed.weight.is_meta
    memory.available = None  # unknown (no /proc/meminfo): loads
    assert not from_pretrained(folder).embed.weight.is_meta


# ----------------------------------------------------------------------------- the library API


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    moe = MoEConfig(dim=16, n_routed_experts=4, n_shared_experts=1, top_k=2, expert_dim=8)
    return MoETransformer(ModelConfig(vocab_size=20, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16,
                                      moe=moe)).eval()


ids = lambda *shape: torch.randint(0, 20, shape)  # noqa: E731
BAD_FORWARD = {
    "float-ids": (lambda: ids(2, 4).float(), None, TypeError, "idx_BS must hold integer token ids"),
    "list-ids": (lambda: [[1, 2]], None, TypeError, "idx_BS must be a torch.Tensor"),
    "one-dim": (lambda: ids(4), None, ValueError, r"idx_BS must have shape \(batch, sequence\)"),
    "three-dim": (lambda: ids(2, 4, 1), None, ValueError, "idx_BS must have shape"),
    "empty-batch": (lambda: ids(0, 4), None, ValueError, r"both >= 1, got \(0, 4\)"),
    "empty-sequence": (lambda: ids(2, 0), None, ValueError, r"both >= 1, got \(2, 0\)"),
    "too-long": (lambda: ids(1, 17), None, ValueError, "exceeds max_seq_len=16"),
    "id-vocab": (lambda: torch.tensor([[1, 20]]), None, ValueError, r"from 1 to 20: .* \[0, vocab_size=20\)"),
    "id-negative": (lambda: torch.tensor([[-1, 2]]), None, ValueError, "idx_BS holds token ids from -1"),
    "targets-shape": (lambda: ids(2, 4), lambda: ids(2, 3), ValueError, r"targets_BS has shape \(2, 3\)"),
    "targets-int32": (lambda: ids(2, 4), lambda: ids(2, 4).int(), TypeError, "targets_BS must hold integer"),
    "targets-vocab": (lambda: ids(1, 2), lambda: torch.tensor([[0, 20]]), ValueError, "targets_BS holds ids"),
    "targets-minus-two": (lambda: ids(1, 2), lambda: torch.tensor([[0, -2]]), ValueError, "or -1 \\(ignored\\)"),
}


@pytest.mark.parametrize("idx,targets,error,words", BAD_FORWARD.values(), ids=BAD_FORWARD.keys())
def test_forward_refuses(model, idx, targets, error, words):
    with pytest.raises(error, match=words):
        model(idx(), None if targets is None else targets())


def test_forward_accepts_int32_ids_and_ignored_targets(model):
    _, loss = model(ids(2, 4).int(), torch.tensor([[1, -1, 2, -1], [-1, -1, 3, 4]]))
    assert torch.isfinite(loss)


def test_ids_are_checked_in_training_while_the_moe_checks_its_inputs(model):
    model.train()
    try:
        with pytest.raises(ValueError, match="vocab_size=20"):
            model(torch.tensor([[1, 25]]))
    finally:
        model.eval()


BAD_GENERATE = {
    "max-new-negative": (dict(max_new_tokens=-1), ValueError, "max_new_tokens=-1"),
    "max-new-float": (dict(max_new_tokens=2.5), ValueError, "max_new_tokens=2.5"),
    "max-new-bool": (dict(max_new_tokens=True), ValueError, "max_new_tokens=True"),
    "temperature-nan": (dict(temperature=float("nan")), ValueError, "temperature=nan"),
    "temperature-negative": (dict(temperature=-1.0), ValueError, "temperature=-1.0"),
    "temperature-str": (dict(temperature="1"), ValueError, "temperature='1'"),
    "top-k-zero": (dict(top_k=0), ValueError, "top_k=0"),
    "top-k-float": (dict(top_k=2.5), ValueError, "top_k=2.5"),
    "top-p-zero": (dict(top_p=0.0), ValueError, "top_p=0.0"),
    "top-p-above-one": (dict(top_p=1.5), ValueError, "top_p=1.5"),
    "generator-seed": (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    "prompt-out-of-vocab": (dict(idx_BS=torch.tensor([[3, 99]])), ValueError, "from 3 to 99"),
    "prompt-empty": (dict(idx_BS=torch.zeros(1, 0, dtype=torch.long)), ValueError, r"got \(1, 0\)"),
    "prompt-float": (dict(idx_BS=torch.zeros(1, 2)), TypeError, "integer token ids"),
}


@pytest.mark.parametrize("changes,error,words", BAD_GENERATE.values(), ids=BAD_GENERATE.keys())
def test_generate_refuses(model, changes, error, words):
    with pytest.raises(error, match=words):
        model.generate(**(dict(idx_BS=ids(1, 3), max_new_tokens=2) | changes))


def test_generate_zero_new_tokens_returns_the_prompt(model):
    prompt = ids(1, 3)
    assert torch.equal(model.generate(prompt, 0), prompt)


BAD_LOAD_ARGS = {
    "dtype-str": (dict(dtype="bf16"), TypeError, "dtype='bf16' is invalid"),
    "dtype-int": (dict(dtype=torch.int8), ValueError, "dtype=torch.int8 is not allowed"),
    "device-unknown": (dict(device="tpu"), ValueError, "device='tpu' is not allowed"),
    "device-int": (dict(device=3), TypeError, "device=3 is invalid"),
    "device-empty": (dict(device=""), ValueError, "device='' is not allowed"),
    "device-absent-gpu": (dict(device="cuda:99"), ValueError, "device='cuda:99' is not available"),
    "semantics": (dict(semantics="vllm"), ValueError, "semantics='vllm' is not allowed"),
}


@pytest.mark.parametrize("kwargs,error,words", BAD_LOAD_ARGS.values(), ids=BAD_LOAD_ARGS.keys())
def test_from_pretrained_refuses_arguments_before_reading(tmp_path, kwargs, error, words):
    with pytest.raises(error, match=words):
        from_pretrained(tmp_path / "nothing-here", **kwargs)

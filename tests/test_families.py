"""The HuggingFace MoE families besides DeepSeek's (dsmoe.families): folders that transformers itself writes for
Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, GLM-4.5 (glm4_moe), dots1 and the dense Llama/Qwen2/Qwen3 load into dsmoe's
one model with logits equal to transformers' own class, sharded or not; greedy generation with dsmoe's KV cache
equals greedy decoding by transformers; the folder dsmoe writes back loads in transformers with equal logits;
the parameter counts are transformers'; what dsmoe cannot compute exactly is refused naming the field."""

import json
from typing import Any

import pytest
import torch

from dsmoe.families import FAMILIES, MOE_FAMILIES
from dsmoe.pretrained import PretrainedError, from_pretrained, model_config_from_hf, save_pretrained

transformers = pytest.importorskip("transformers", minversion="5.0")

BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES: dict[str, dict[str, Any]] = {  # each family with the options its releases use, and some they allow
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, intermediate_size=40, mlp_only_layers=[0],
                      norm_topk_prob=True),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=40,
                      head_dim=12, decoder_sparse_step=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, intermediate_size=32,
                     first_k_dense_replace=1, n_group=2, topk_group=1, attention_bias=True,
                     routed_scaling_factor=2.5, use_qk_norm=True),
    "dots1": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32,
                  first_k_dense_replace=1, n_shared_experts=2, n_group=1, topk_group=1, norm_topk_prob=True,
                  routed_scaling_factor=2.0),
    "llama": dict(intermediate_size=40),
    "qwen2": dict(intermediate_size=40),
    "qwen3": dict(intermediate_size=40, head_dim=12),
}


def hf_model(model_type: str, fields: dict | None = None, seed: int = 0):
    """transformers' own model of a family, fp32, eval mode, with random weights everywhere (norms, biases and the
    balancing bias too, so that a weight read into the wrong place shows)."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **(BASE | CASES[model_type] | (fields or {})))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if "rotary" in name or "inv_freq" in name:
                continue
            noise = torch.randn(t.shape, generator=g)
            t.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else noise * (0.1 if t.dim() == 1 else 0.2))
    return model


def _ids(seed=1, length=16):
    return torch.randint(0, BASE["vocab_size"], (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
@pytest.mark.parametrize("model_type", CASES)
def test_logits_equal_transformers(model_type, shard, tmp_path):
    reference = hf_model(model_type)
    reference.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    model = from_pretrained(tmp_path)
    assert model.cfg.family == model_type
    assert model.cfg.num_params() == sum(p.numel() for p in reference.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(_ids())[0], reference(_ids()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", CASES)
def test_greedy_generation_and_the_saved_folder(model_type, tmp_path):
    """dsmoe's generate (KV cache) equals greedy decoding by transformers' forward, token for token; the folder dsmoe
    writes loads in transformers with equal logits and the family's own config.json."""
    reference = hf_model(model_type)
    reference.save_pretrained(tmp_path / "theirs")
    model = from_pretrained(tmp_path / "theirs")
    prompt = _ids(length=5)[:1]
    ours = model.generate(prompt, 12, temperature=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(12):
            tokens = torch.cat([tokens, reference(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, tokens)
    save_pretrained(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"] == [FAMILIES[model_type].architecture]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, reference(_ids()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", [m for m in CASES if m != "dots1"])  # dots1's class has no expert defaults
def test_a_field_left_out_reads_as_transformers_reads_it(model_type):
    """config.json with only model_type: every field is transformers' class default (dsmoe holds its own table)."""
    given = {"glm4_moe": {"head_dim": 128},  # its class default (4096 // 96) has odd rotary dims
             "qwen3": {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 16},  # head_dim 128
             }.get(model_type, {})
    ours = model_config_from_hf({"model_type": model_type, **given})
    theirs = model_config_from_hf(transformers.AutoConfig.for_model(model_type, **given).to_dict())
    assert ours == theirs


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", "olmoe", "qwen2_moe", "glm4_moe"])
def test_attention_bias_as_each_family_places_it(model_type, tmp_path):
    """attention_bias=true: Llama, Qwen3(-MoE), OLMoE and dots1 put a bias on o_proj too, GLM-4.5 (and Qwen2's
    qkv_bias) on q/k/v only; equal to transformers' logits, and written back with the same keys."""
    field = "qkv_bias" if model_type == "qwen2_moe" else "attention_bias"
    reference = hf_model(model_type, {field: True})
    reference.save_pretrained(tmp_path / "a")
    model = from_pretrained(tmp_path / "a")
    assert model.cfg.o_bias == (model_type in ("llama", "qwen3_moe", "olmoe"))
    with torch.no_grad():
        torch.testing.assert_close(model(_ids())[0], reference(_ids()).logits, atol=1e-5, rtol=1e-5)
    save_pretrained(model, tmp_path / "b")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())


def test_glm_multi_token_prediction_layer_is_left_out_as_transformers_does(tmp_path):
    """GLM-4.5 ships its MTP layer as model.layers.{num_hidden_layers}; transformers ignores it, and so does dsmoe
    (a DeepSeek release's MTP modules are kept: tests/test_pretrained.py)."""
    reference = hf_model("glm4_moe")
    reference.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids())[0], reference(_ids()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type,change,match", [
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 16}, r"use_sliding_window=true .*sliding-window "
                                                                       "attention is not supported"),
    ("mixtral", {"sliding_window": 16}, r"sliding_window=16: sliding-window attention is not supported"),
    ("qwen2_moe", {"layer_types": ["sliding_attention", "full_attention", "full_attention"]},
     r"layer_types \(layers \[0\] are \['sliding_attention'\]\)"),
    ("olmoe", {"clip_qkv": 8.0}, r"clip_qkv=8.0 is not supported"),
    ("llama", {"mlp_bias": True}, r"mlp_bias=true is not supported"),
    ("qwen3_moe", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported; dsmoe supports 'silu'"),
    ("qwen3_moe", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"rope scaling 'linear' is not supported"),
    ("glm4_moe", {"partial_rotary_factor": 1.5}, r"partial_rotary_factor=1.5 is invalid"),
    ("qwen2_moe", {"mlp_only_layers": [7]}, r"mlp_only_layers=\[7\] is invalid"),
    ("mixtral", {"num_local_experts": 0}, r"num_local_experts=0 is invalid"),
])
def test_what_dsmoe_cannot_compute_exactly_is_refused(model_type, change, match, tmp_path):
    hf_model(model_type).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(PretrainedError, match=match):
        from_pretrained(tmp_path)


def test_a_window_as_long_as_the_context_is_no_window(tmp_path):
    hf_model("mixtral", {"sliding_window": 64}).save_pretrained(tmp_path)
    assert from_pretrained(tmp_path).cfg.family == "mixtral"


def test_an_unknown_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen9_moe"}))
    with pytest.raises(PretrainedError, match=r"model_type='qwen9_moe' is not supported; choose one of "
                                              r"deepseek_v2, deepseek_v3, kimi_k2, qwen2_moe, .*mixtral"):
        from_pretrained(tmp_path)


def test_keys_that_do_not_fit_the_config_are_named(tmp_path):
    hf_model("mixtral").save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.1.block_sparse_moe.experts.9.w1.weight"] = weights.pop(
        "model.layers.1.block_sparse_moe.experts.3.w1.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PretrainedError, match=r"missing keys \[model.layers.1.block_sparse_moe.experts.3.w1.weight\]; "
                                              r"unexpected keys \[model.layers.1.block_sparse_moe.experts.9.w1.weight"):
        from_pretrained(tmp_path)


def test_a_model_a_family_cannot_hold_is_not_exported(tmp_path):
    hf_model("qwen3_moe").save_pretrained(tmp_path / "a")
    model = from_pretrained(tmp_path / "a")
    model.moe_layers()[0].gate.bias.fill_(0.5)  # a loss-free bias: Qwen3-MoE's checkpoints have no place for it
    with pytest.raises(PretrainedError, match="qwen3_moe \\(softmax\\) checkpoints have no e_score_correction_bias"):
        save_pretrained(model, tmp_path / "b")
    assert sorted(MOE_FAMILIES) == ["dots1", "glm4_moe", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]


# ---- fine-tuning a family's release loss-free ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe"])
def test_train_init_balances_any_family_loss_free(model_type, tmp_path, capsys, monkeypatch):
    """train --init of a family's folder trains the gate's balancing bias (u = 1e-3, MaxVio in every row): a softmax
    family (Qwen3-MoE) gets a bias for the choice of experts only, which its format cannot hold, so the run keeps
    its dsmoe checkpoint and says so; a sigmoid family (GLM-4.5) holds it as e_score_correction_bias, so RUN/hf
    is written and transformers loads it with dsmoe's logits."""
    from dsmoe.checkpoint import load_checkpoint
    from dsmoe.cli import main

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    hf_model(model_type, {"vocab_size": 260}).save_pretrained(tmp_path / "release")  # dsmoe's byte tokenizer fits
    out = tmp_path / "run"
    assert main(["train", "--init", str(tmp_path / "release"), "--preset", "debug", "--steps", "4", "--quiet",
                 "--out", str(out), "--set", "seq_len=32", "--set", "batch_size=4", "--set", "eval_batches=1",
                 "--set", "tensorboard=false"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(r["maxvio"] for r in rows if r["kind"] == "train")
    trained = load_checkpoint(out)[0]
    assert trained.cfg.family == model_type
    assert any(layer.gate.bias.abs().sum() > 0 for layer in trained.moe_layers())
    if model_type == "qwen3_moe":
        assert "no HuggingFace folder written" in capsys.readouterr().out and not (out / "hf").exists()
        return
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 260, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, trained.eval()(ids)[0], atol=1e-5, rtol=1e-5)


def test_inspect_compares_a_deepseek_and_a_glm_release_side_by_side(tmp_path, capsys, monkeypatch):
    """`dsmoe inspect A B` on two families' folders: each its routing report, one table naming both families."""
    from dsmoe.cli import main

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV3Config(
        vocab_size=260, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        max_position_embeddings=64)).save_pretrained(tmp_path / "v3")
    hf_model("glm4_moe", {"vocab_size": 260}).save_pretrained(tmp_path / "glm")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{j}(x):\n    return x + {j}\n" for j in range(300)))
    out = tmp_path / "cmp"
    assert main(["inspect", str(tmp_path / "v3"), str(tmp_path / "glm"), "--data", str(corpus), "--out", str(out),
                 "--batches", "1", "--batch-size", "2", "--seq-len", "16", "--redundancy-batches", "1",
                 "--quiet"]) == 0
    table = (out / "compare.md").read_text()
    assert "| family | deepseek | glm4_moe |" in table and "MaxVio_global" in table
    blocks = json.loads((out / "glm" / "results.json").read_text())["blocks"]
    assert blocks == [1, 2]  # GLM's first block is dense (first_k_dense_replace=1)


# ---- real releases: dsmoe's count from their config.json against the published one ---------------------------

# Field values of each release's config.json (Hugging Face hub: Qwen/Qwen1.5-MoE-A2.7B, Qwen/Qwen3-30B-A3B,
# Qwen/Qwen3-235B-A22B, mistralai/Mixtral-8x7B-v0.1, allenai/OLMoE-1B-7B-0924, zai-org/GLM-4.5-Air, zai-org/GLM-4.5,
# rednote-hilab/dots.llm1.base); fields they leave at the class default are left out here too.
_QWEN3 = dict(model_type="qwen3_moe", vocab_size=151936, head_dim=128, num_key_value_heads=4, num_experts=128,
              num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1e6, max_position_embeddings=40960)
_GLM = dict(model_type="glm4_moe", vocab_size=151552, num_key_value_heads=8, head_dim=128, num_attention_heads=96,
            n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1, norm_topk_prob=True,
            partial_rotary_factor=0.5, attention_bias=True, num_nextn_predict_layers=1, rope_theta=1e6)
RELEASES = {
    "Qwen1.5-MoE-A2.7B": (dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                               moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
                               num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                               norm_topk_prob=False, max_position_embeddings=8192), 14.3e9, 2.7e9),
    "Qwen3-30B-A3B": (_QWEN3 | dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                    num_hidden_layers=48, num_attention_heads=32), 30.5e9, 3.3e9),
    "Qwen3-235B-A22B": (_QWEN3 | dict(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                                      num_hidden_layers=94, num_attention_heads=64), 235e9, 22e9),
    "Mixtral-8x7B": (dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                          num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=32768), 46.7e9, 12.9e9),
    "OLMoE-1B-7B": (dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                         num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                         num_experts_per_tok=8, max_position_embeddings=4096), 6.9e9, 1.3e9),
    "GLM-4.5-Air": (_GLM | dict(hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
                                num_hidden_layers=46, n_routed_experts=128, first_k_dense_replace=1), 106e9, 12e9),
    "GLM-4.5": (_GLM | dict(hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=92,
                            n_routed_experts=160, first_k_dense_replace=3, use_qk_norm=True), 355e9, 32e9),
    "dots.llm1": (dict(model_type="dots1", vocab_size=152064, hidden_size=4096, intermediate_size=10944,
                       moe_intermediate_size=1408, num_hidden_layers=62, num_attention_heads=32,
                       num_key_value_heads=32, n_routed_experts=128, n_shared_experts=2, num_experts_per_tok=6,
                       first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5), 142e9, 14e9),
}


@pytest.mark.parametrize("name", RELEASES)
def test_a_releases_count_is_its_published_one(name):
    """Total parameters within 1% of the published figure (GLM-4.5 publishes its MTP layer in the total, which
    dsmoe, like transformers, leaves out: 0.7% under); active within 1% where the release counts its embedding and
    output matrices (GLM publishes its actives without them: Air 13.4B - 1.2B = 12.2B, GLM-4.5 33.6B - 1.6B)."""
    config, total, active = RELEASES[name]
    with torch.device("meta"):
        from dsmoe.model import MoETransformer
        cfg = model_config_from_hf(config)
        assert cfg.num_params() == sum(p.numel() for p in MoETransformer(cfg).parameters())
    assert cfg.num_params() == pytest.approx(total, rel=0.01)
    counted = cfg.num_active_params() - (cfg.vocab_size * cfg.dim * 2 if name.startswith("GLM") else 0)
    assert counted == pytest.approx(active, rel=0.05 if name.startswith("GLM") else 0.025)


def test_generate_and_eval_take_a_family_folder(tmp_path, capsys, monkeypatch):
    from dsmoe.cli import main

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    hf_model("qwen2_moe", {"vocab_size": 260}).save_pretrained(tmp_path / "q")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{j}(x):\n    return x + {j}\n" for j in range(300)))
    assert main(["generate", "--model", str(tmp_path / "q"), "--prompt", "def ", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["eval", "--model", str(tmp_path / "q"), "--data", str(corpus), "--batches", "1"]) == 0
    assert "MaxVio_global per MoE layer" in capsys.readouterr().out


def test_a_qwen2_shared_expert_is_not_written_as_deepseek():
    from dsmoe.config import MoEConfig
    from dsmoe.hf import moe_config_to_hf

    with pytest.raises(ValueError, match="a gated shared expert or one of its own width"):
        moe_config_to_hf(MoEConfig(dim=32, n_routed_experts=8, top_k=2, expert_dim=16, n_shared_experts=1,
                                   shared_expert_dim=24, shared_expert_gate=True))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe", "mixtral"])
def test_rope_theta_and_yarn_kept_where_transformers_keeps_them(model_type, tmp_path):
    """transformers 5 writes rope_theta (and yarn) into rope_parameters: read there, over the class default; yarn's
    frequencies and attention factor equal transformers' at positions past the original context."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 5e5,
            "beta_fast": 16, "beta_slow": 2}
    if model_type == "glm4_moe":  # not the class default 0.5, and only in rope_parameters, as transformers keeps it
        yarn["partial_rotary_factor"] = 0.25
    if model_type == "mixtral":  # transformers' Mixtral fails to build with yarn here: its theta alone
        yarn = {"rope_type": "default", "rope_theta": 5e5}
    reference = hf_model(model_type, {"rope_parameters": yarn})
    reference.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.cfg.rope_theta == 5e5 and (model.cfg.rope_scaling is not None) == (model_type != "mixtral")
    with torch.no_grad():
        torch.testing.assert_close(model(_ids(length=60))[0], reference(_ids(length=60)).logits, atol=1e-5, rtol=1e-5)

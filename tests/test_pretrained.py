"""Whole DeepSeek-V2/V3 models (dsmoe.pretrained): folders that transformers itself writes load into dsmoe
with logits equal to transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM (V3 with q_lora, yarn and
expert groups; V3 without q_lora; V2 softmax greedy without q_lora, V2-Lite-like; V2 group-limited with
q_lora; sharded folders with an index); the folders dsmoe writes load into transformers with equal logits;
greedy generation with the latent KV cache equals generation without it and transformers'; MTP weights
survive load -> save bit for bit; a bad folder is an error naming what is wrong."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsmoe.pretrained import PretrainedError, from_pretrained, model_config_from_hf, save_pretrained

transformers = pytest.importorskip("transformers", minversion="5.0")

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, first_k_dense_replace=1, max_position_embeddings=64, n_shared_experts=1)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0}
CASES = {
    "v3-qlora-yarn-groups": ("deepseek_v3", dict(q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2,
                                                 n_group=4, topk_group=2, rope_parameters=YARN)),
    "v3-no-qlora": ("deepseek_v3", dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                        topk_group=1)),
    "v2-lite-greedy": ("deepseek_v2", dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
                                           topk_method="greedy", n_group=1, topk_group=1)),
    "v2-group-limited-qlora": ("deepseek_v2", dict(q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3,
                                                   topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                                   routed_scaling_factor=16.0)),
    "v3-tied-halves-all-moe": ("deepseek_v3", dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
                                                   n_group=1, topk_group=1, tie_word_embeddings=True,
                                                   rope_interleave=False, first_k_dense_replace=0)),
}


def hf_model(model_type: str, fields: dict, seed: int = 0):
    """transformers' own causal LM, random weights (a nonzero V3 balancing bias), fp32, eval mode."""
    Config = transformers.DeepseekV3Config if model_type == "deepseek_v3" else transformers.DeepseekV2Config
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(Config(**(BASE | fields)), dtype=torch.float32).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def _ids(seed=1, length=12):
    return torch.randint(0, BASE["vocab_size"], (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
def test_logits_equal_transformers(case, shard, tmp_path):
    reference = hf_model(*case)
    reference.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    model = from_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], reference(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_saved_folder_loads_in_transformers(case, tmp_path):
    reference = hf_model(*case)
    reference.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "dsmoe", max_shard_size=30_000)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dsmoe", dtype=torch.float32).eval()
    ids = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [CASES["v3-qlora-yarn-groups"], CASES["v2-lite-greedy"]], ids=["v3", "v2"])
def test_greedy_generation_cache_equals_recompute_and_transformers(case, tmp_path):
    reference = hf_model(*case)
    reference.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    prompt = _ids(3, 5)[:1]
    cached = model.generate(prompt, 20, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):  # no cache: the whole sequence again every step
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        theirs = reference.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert torch.equal(cached, seq)
    assert torch.equal(cached, theirs)


def test_latent_cache_holds_the_compressed_kv(tmp_path):
    hf_model(*CASES["v3-no-qlora"]).save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.layers[0].attn.cache_shapes() == [(BASE["kv_lora_rank"],), (BASE["qk_rope_head_dim"],)]


def test_mtp_weights_round_trip_bit_exactly(tmp_path):
    hf_model(*CASES["v3-qlora-yarn-groups"]).save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    L = BASE["num_hidden_layers"]
    for key in [k for k in sd if k.startswith(f"model.layers.{L - 1}.")]:  # the MTP block: a copy of the last
        sd[key.replace(f"layers.{L - 1}.", f"layers.{L}.")] = torch.randn(sd[key].shape, generator=g)
    D = BASE["hidden_size"]
    sd |= {f"model.layers.{L}.enorm.weight": torch.randn(D, generator=g),
           f"model.layers.{L}.hnorm.weight": torch.randn(D, generator=g),
           f"model.layers.{L}.eh_proj.weight": torch.randn(D, 2 * D, generator=g),
           f"model.layers.{L}.shared_head.norm.weight": torch.randn(D, generator=g),
           f"model.layers.{L}.embed_tokens.weight": sd["model.embed_tokens.weight"].clone(),
           f"model.layers.{L}.shared_head.head.weight": sd["lm_head.weight"].clone()}
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    model = from_pretrained(tmp_path / "hf")
    assert len(model.mtp) == 1
    with torch.no_grad():
        model(_ids())
    assert model.routing_stats()["tokens_per_expert"].shape[0] == L - 1  # the model's own MoE blocks, not MTP's
    save_pretrained(model, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out.keys() == sd.keys()
    for key, t in sd.items():
        assert torch.equal(out[key], t), key


def test_mtp_loss_trains_and_is_off_at_inference():
    from dsmoe.config import ModelConfig, MoEConfig
    from dsmoe.model import MoETransformer

    moe = MoEConfig(dim=32, n_routed_experts=4, n_shared_experts=1, top_k=2, expert_dim=16, score_func="sigmoid",
                    norm_topk_prob=True)
    cfg = ModelConfig(vocab_size=32, dim=32, n_layers=2, n_heads=2, max_seq_len=32, moe=moe, kv_lora_rank=8,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, mtp_layers=2, tie_embeddings=False)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    data = torch.arange(32).repeat(8, 2)[:, :33]  # a repeating pattern: learnable
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        _, loss = model(x, y)
        assert torch.equal(model.aux_loss(), model.mtp_loss)  # no balance loss configured: the MTP loss alone
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else model.mtp_loss.item()
    assert model.mtp_loss.item() < first / 2  # the MTP modules learn to predict 2 and 3 tokens ahead
    model.eval()
    model.mtp_loss = torch.zeros(())
    with torch.no_grad():
        logits, _ = model(x, y)
    assert model.mtp_loss.item() == 0  # not computed at inference
    model.mtp = torch.nn.ModuleList()
    with torch.no_grad():
        assert torch.equal(model(x)[0], logits)  # the MTP modules do not touch the main logits


# ---- bad folders ---------------------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    hf_model(*CASES["v3-no-qlora"]).save_pretrained(tmp_path, max_shard_size="20KB")
    return tmp_path


def test_missing_shard(folder):
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(PretrainedError, match=f"missing safetensors file.*{shard.name}"):
        from_pretrained(folder)


def test_wrong_shape_names_the_key(tmp_path):
    hf_model(*CASES["v3-no-qlora"]).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PretrainedError, match=r"model.layers.1.self_attn.kv_b_proj.weight: file \(3, 3\)"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported; choose one of deepseek_v2"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"kv_lora_rank": None}, "Multi-head Latent Attention"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": None}, "rope scaling 'linear'"),
], ids=["model-type", "activation", "no-mla", "rope"])
def test_unsupported_config(folder, change, match):
    cfg = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        from_pretrained(folder)


def test_extra_and_missing_keys(tmp_path):
    hf_model(*CASES["v3-no-qlora"]).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.9.mystery.weight"] = torch.zeros(2)
    del sd["model.norm.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PretrainedError, match=r"missing keys \[model.norm.weight\]; unexpected keys "
                                              r"\[model.layers.9.mystery.weight\]"):
        from_pretrained(tmp_path)


def test_config_of_a_list_or_missing(tmp_path):
    with pytest.raises(PretrainedError, match="config.json is missing"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(PretrainedError, match="must hold a JSON object"):
        from_pretrained(tmp_path)


def test_bf16_stays_bf16(tmp_path):
    hf_model(*CASES["v3-no-qlora"]).to(torch.bfloat16).save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.embed.weight.dtype == torch.bfloat16
    assert all(layer.gate.bias.dtype == torch.float32 for layer in model.moe_layers())
    assert from_pretrained(tmp_path, dtype=torch.float32).embed.weight.dtype == torch.float32


def test_config_round_trip():
    d = transformers.DeepseekV3Config(**BASE, **CASES["v3-qlora-yarn-groups"][1]).to_dict()
    cfg = model_config_from_hf(d)
    assert cfg.rope_scaling["factor"] == 4.0 and cfg.q_lora_rank == 24 and cfg.mla


# ---- the command line -------------------------------------------------------------------------------------------

BYTES = dict(BASE, vocab_size=260, max_position_embeddings=64)  # dsmoe's byte tokenizer fits


@pytest.fixture
def byte_folder(tmp_path):
    """A tiny V3 folder whose vocabulary is the byte tokenizer's, and a small corpus of Python files."""
    Config = transformers.DeepseekV3Config
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        Config(**BYTES, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1),
        dtype=torch.float32)
    model.save_pretrained(tmp_path / "hf")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(40)))
    return tmp_path / "hf", corpus


def test_generate_and_eval_take_a_hf_folder(byte_folder, capsys, monkeypatch, tmp_path):
    from dsmoe.cli import main

    folder, corpus = byte_folder
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    assert main(["generate", "--model", str(folder), "--prompt", "def ", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["eval", "--model", str(folder), "--data", str(corpus), "--batches", "1"]) == 0
    assert "MaxVio_global per MoE layer" in capsys.readouterr().out


@pytest.mark.slow
def test_train_init_fine_tunes_and_the_result_loads_in_transformers(byte_folder, capsys, monkeypatch, tmp_path):
    from dsmoe.cli import main

    folder, corpus = byte_folder
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    before = from_pretrained(folder)
    out = tmp_path / "run"
    argv = ["train", "--init", str(folder), "--preset", "debug", "--data", str(corpus), "--out", str(out),
            "--steps", "4", "--quiet", "--set", "seq_len=32", "--set", "batch_size=4", "--set", "eval_batches=1",
            "--set", "tensorboard=false"]
    assert main(argv) == 0
    after = from_pretrained(out / "hf")
    assert not torch.equal(after.layers[1].attn.kv_b_proj.weight, before.layers[1].attn.kv_b_proj.weight)
    assert any(layer.gate.bias.abs().sum() > 0 for layer in after.moe_layers())  # the loss-free bias moved
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 260, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, after(ids)[0], atol=1e-5, rtol=1e-5)
    assert main(["export", str(out), str(tmp_path / "exported")]) == 0  # the same, from the checkpoint
    exported = from_pretrained(tmp_path / "exported")
    for a, b in zip(exported.state_dict().values(), after.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_train_init_fine_tunes_on_prompt_completion_records(byte_folder, capsys, monkeypatch, tmp_path):
    """`dsmoe train --init DIR --data sft.jsonl`: a supervised fine-tune (completion tokens only, documents
    masked apart) of a DeepSeek folder; the records are prepared on the fly with the folder's tokenizer."""
    from dsmoe.cli import main

    folder, _ = byte_folder
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    records = [{"prompt": f"def f{i}(x):\n", "completion": f"    return x + {i}\n"} for i in range(80)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["train", "--init", str(folder), "--preset", "debug", "--data", str(tmp_path / "sft.jsonl"), "--out",
            str(tmp_path / "run"), "--steps", "6", "--quiet", "--set", "seq_len=32", "--set", "batch_size=4",
            "--set", "eval_batches=1", "--set", "tensorboard=false", "--set", "doc_mask=true", "--set", "lr=1e-3"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] < summary["init_val_loss"]


def test_a_folders_own_tokenizer_is_used(byte_folder, capsys):
    """A HuggingFace tokenizer.json (the `tokenizers` format) and its eos_token come with the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dsmoe.cli import main
    from dsmoe.tokenizer import HFTokenizer, load_tokenizer

    folder, _ = byte_folder
    vocab = {w: i for i, w in enumerate(["<eos>", "def", "return", "x", "f", "(", ")", ":", "+", "1"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<eos>"}}))
    loaded = load_tokenizer(folder)
    assert isinstance(loaded, HFTokenizer) and loaded.eos_id == 0 and loaded.encode("def f ( x )") == [1, 4, 5, 3, 6]
    assert main(["generate", "--model", str(folder), "--prompt", "def f", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("def f")


@pytest.mark.slow
def test_an_mla_preset_run_ends_as_a_folder_transformers_loads(byte_folder, tmp_path, monkeypatch):
    """`dsmoe train --preset debug-mla` writes RUN/hf: the trained model, which transformers loads with equal
    logits (tied embeddings, as dsmoe's presets have them)."""
    from dsmoe.checkpoint import load_checkpoint
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    _, corpus = byte_folder
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    sets = ["steps=3", "seq_len=32", "batch_size=4", "eval_batches=1", "tensorboard=false", f"data={corpus}",
            f"out={tmp_path / 'run'}"]
    train(*build_configs("debug-mla", sets), progress=False)
    ours = load_checkpoint(tmp_path / "run")[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids)[0], atol=1e-5, rtol=1e-5)
    from dsmoe.cli import main
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    for folder in (tmp_path / "run" / "hf", tmp_path / "exported"):  # both ways out stop on the tokenizer's EOS
        assert transformers.GenerationConfig.from_pretrained(folder).eos_token_id == 257


def test_run_configs_of_an_init(byte_folder):
    """`train --init`'s policy, for library callers too: the folder's architecture, the preset's run settings, a
    V3 (sigmoid) gate's bias trained loss-free at u = 1e-3 unless a --set says otherwise, out runs/<folder>."""
    from dsmoe.train import run_configs

    hf, _ = byte_folder
    model_cfg, train_cfg, notes = run_configs(init=str(hf))
    assert model_cfg.moe is not None and model_cfg.moe.bias_update_speed == 1e-3 and model_cfg.moe.n_routed_experts == 8
    assert train_cfg.init == str(hf) and train_cfg.out == "runs/hf" and train_cfg.preset == "tiny" and notes == []
    model_cfg, train_cfg, _ = run_configs("debug", ["moe.bias_update_speed=0", "out=elsewhere"], init=str(hf))
    assert model_cfg.moe is not None and model_cfg.moe.bias_update_speed == 0 and train_cfg.out == "elsewhere"
    assert train_cfg.preset == "debug"


# ---- FP8 releases -----------------------------------------------------------------------------------------------

def _quantize_blockwise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w as DeepSeek's FP8 releases store it: e4m3 numbers and a float32 scale per block (its amax / 448)."""
    out, inp = w.shape
    rows, cols = -(-out // block[0]), -(-inp // block[1])
    scale = torch.zeros(rows, cols)
    q = torch.zeros_like(w)
    for i in range(rows):
        for j in range(cols):
            part = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            scale[i, j] = part.abs().max().clamp(min=1e-12) / 448.0
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = part / scale[i, j]
    return q.to(torch.float8_e4m3fn), scale


def _dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The reference: each block's stored numbers times its scale, one block at a time."""
    w = q.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= scale[i, j]
    return w


QUANTIZED = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
             "up_proj", "down_proj")


@pytest.mark.parametrize("model_type", ["deepseek_v3", "kimi_k2"])
def test_an_fp8_release_loads_dequantized_block_by_block(tmp_path, model_type):
    """A folder quantized as DeepSeek-V3/Kimi-K2 ship (e4m3 + weight_scale_inv per block, quantization_config)
    loads equal to dequantizing by hand: exactly, for every weight, in every ragged edge block."""
    reference = hf_model("deepseek_v3", dict(q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2,
                                              n_group=2, topk_group=1))
    reference.save_pretrained(tmp_path / "full")
    block = (8, 12)  # small blocks: shapes of 16-48 leave ragged edges, as 7168 / 128 does not
    tensors = load_file(tmp_path / "full" / "model.safetensors")
    quantized, by_hand = {}, {}
    for key, t in tensors.items():
        if key.endswith(".weight") and key.split(".")[-2] in QUANTIZED:
            q, scale = _quantize_blockwise(t, block)
            quantized[key], quantized[key + "_scale_inv"] = q, scale
            by_hand[key] = _dequantize_blockwise(q, scale, block)
        else:
            quantized[key] = by_hand[key] = t
    assert len(by_hand) < len(quantized) and any(k.endswith("_scale_inv") for k in quantized)
    (tmp_path / "fp8").mkdir()
    save_file(quantized, tmp_path / "fp8" / "model.safetensors")
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    config |= {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": list(block)}, "model_type": model_type}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hand").mkdir()
    save_file(by_hand, tmp_path / "hand" / "model.safetensors")
    (tmp_path / "hand" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    ours, hand = from_pretrained(tmp_path / "fp8"), from_pretrained(tmp_path / "hand")
    for (name, a), b in zip(ours.state_dict().items(), hand.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():  # and the quantization is real: near the full-precision model, not equal to it
        full = from_pretrained(tmp_path / "full")(_ids())[0]
        got = ours(_ids())[0]
    assert 0 < (got - full).abs().max() < 0.5 * full.abs().max()


def test_an_fp8_folder_without_its_scales_or_config_is_refused(tmp_path):
    reference = hf_model("deepseek_v3", dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
                                              n_group=2, topk_group=1))
    reference.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.o_proj.weight"
    q, scale = _quantize_blockwise(tensors[key], (128, 128))
    save_file(tensors | {key: q}, tmp_path / "model.safetensors")
    with pytest.raises(PretrainedError, match="weights are FP8 .*o_proj.*quantization_config"):
        from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="do not pair up: model.layers.0.self_attn.o_proj.weight"):
        from_pretrained(tmp_path)
    save_file(tensors | {key: q, key + "_scale_inv": torch.ones(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(PretrainedError, match=r"o_proj.weight_scale_inv is F32 \(2, 2\), but .* shape \(1, 1\)"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_a_field_left_out_reads_as_transformers_reads_it(model_type, tmp_path):
    """config.json without hidden_act, q_lora_rank, first_k_dense_replace, ...: transformers' class defaults."""
    d = {"model_type": model_type, "num_experts_per_tok": 6}
    ours = model_config_from_hf(d)
    theirs = transformers.AutoConfig.for_model(**d)
    assert ours.q_lora_rank == theirs.q_lora_rank == 1536
    assert (ours.dim, ours.n_layers, ours.first_k_dense, ours.vocab_size, ours.max_seq_len) == (
        theirs.hidden_size, theirs.num_hidden_layers, theirs.first_k_dense_replace, theirs.vocab_size,
        theirs.max_position_embeddings)
    assert ours.moe is not None and (ours.moe.n_routed_experts, ours.moe.expert_dim) == (
        theirs.n_routed_experts, theirs.moe_intermediate_size)
    assert model_config_from_hf(d | {"q_lora_rank": None}).q_lora_rank == 0  # a null stays: no query compression
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen9_moe"}))
    with pytest.raises(PretrainedError, match=r"config.json: model_type='qwen9_moe' is not supported; choose one"):
        from_pretrained(tmp_path)


def test_a_re_exported_folder_keeps_its_token_ids_and_generates_until_its_eos(tmp_path):
    """V2-Lite's eos is 100001: a folder loaded and saved again keeps bos/eos/pad in config.json and writes
    generation_config.json, so transformers' generate stops where the release stops (not on its class default)."""
    reference = hf_model(*CASES["v2-lite-greedy"])
    reference.config.update({"bos_token_id": 60, "eos_token_id": 61, "pad_token_id": 62})
    reference.save_pretrained(tmp_path / "a")
    model = from_pretrained(tmp_path / "a")
    assert model.cfg.token_ids == {"bos_token_id": 60, "eos_token_id": 61, "pad_token_id": 62}
    save_pretrained(model, tmp_path / "b")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "b")
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (60, 61, 62)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "b").eos_token_id == 61
    for bad in (-1, model.cfg.vocab_size):
        with pytest.raises(ValueError, match=r"token_ids.*in \[0, vocab_size="):
            dataclasses.replace(model.cfg, token_ids={"eos_token_id": bad})
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps(config | {"model_type": "kimi_k2", "architectures": []}))
    with pytest.raises(PretrainedError, match=r"kimi_k2' is read as deepseek_v3 only with architectures"):
        from_pretrained(tmp_path / "a")


@pytest.mark.slow
def test_a_softmax_release_fine_tunes_loss_free_and_says_why_it_has_no_hf_folder(tmp_path, capsys, monkeypatch):
    """train --init of a V2 (softmax) folder trains a selection-only bias (MaxVio in the log); V2's format cannot
    hold it, so the run keeps its dsmoe checkpoint and says so; with the bias off, RUN/hf is written."""
    from dsmoe.cli import main
    from dsmoe.train import run_configs

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV2Config(
        **BYTES, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, topk_method="greedy"),
        dtype=torch.float32).save_pretrained(tmp_path / "v2")
    model_cfg, _, _ = run_configs(init=str(tmp_path / "v2"))
    assert model_cfg.moe is not None and model_cfg.moe.bias_update_speed == 1e-3
    argv = ["train", "--init", str(tmp_path / "v2"), "--preset", "debug", "--steps", "4", "--quiet", "--set",
            "seq_len=32", "--set", "batch_size=4", "--set", "eval_batches=1", "--set", "tensorboard=false"]
    assert main([*argv, "--out", str(tmp_path / "free")]) == 0
    out = capsys.readouterr().out
    assert "no HuggingFace folder written" in out and "e_score_correction_bias" in out
    assert not (tmp_path / "free" / "hf").exists() and (tmp_path / "free" / "checkpoint").exists()
    rows = [json.loads(line) for line in open(tmp_path / "free" / "metrics.jsonl")]
    assert all(r["maxvio"] for r in rows if r["kind"] == "train")
    from dsmoe.checkpoint import load_checkpoint
    trained = load_checkpoint(tmp_path / "free")[0]
    assert any(layer.gate.bias.abs().sum() > 0 for layer in trained.moe_layers())
    assert main([*argv, "--out", str(tmp_path / "as-released"), "--set", "moe.bias_update_speed=0"]) == 0
    assert from_pretrained(tmp_path / "as-released" / "hf").cfg.moe.score_func == "softmax"

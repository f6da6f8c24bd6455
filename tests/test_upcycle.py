"""dsmoe.upcycle and `dsmoe upcycle`: a dense Llama/Qwen2/Qwen3 folder (built locally by transformers) upcycled into
a DeepSeekMoE folder computes the dense model's logits to 1e-5, in dsmoe and in transformers' Glm4MoeForCausalLM
against the dense transformers class, for shared and no shared slices, sparse upcycling (m = 1), a zero router and
dense first blocks; greedy decoding (one-token forwards) equals the dense model's; every token takes one copy of
each routed slice with weight 1; Drop-Upcycling re-draws exactly floor(r*f) units per expert and keeps the rest;
bad input is an error naming the field; the upcycle study's arms start where they should."""

import json
from typing import Any

import pytest
import torch

from dsmoe import studies
from dsmoe.cli import main
from dsmoe.config import ModelConfig
from dsmoe.model import MoETransformer
from dsmoe.presets import build_configs
from dsmoe.pretrained import from_pretrained, save_pretrained
from dsmoe.upcycle import UpcycleConfig, max_logit_difference, upcycle

transformers = pytest.importorskip("transformers", minversion="5.0")

BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, intermediate_size=48, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES: dict[str, dict[str, Any]] = {  # each with the attention option its releases add
    "llama": {},
    "qwen2": dict(tie_word_embeddings=True),  # and q/k/v biases, always
    "qwen3": dict(head_dim=12),               # and per-head q/k RMSNorm, always
}
SPECS = {  # CLI flags
    "m3-shared1": ["--experts", "8", "--top-k", "2", "--granularity", "3", "--shared", "1"],
    "m3-no-shared": ["--experts", "6", "--top-k", "3", "--granularity", "3"],
    "m1-sparse": ["--experts", "4", "--top-k", "1", "--granularity", "1"],
    "zero-router": ["--experts", "8", "--top-k", "2", "--granularity", "3", "--shared", "1", "--router-std", "0"],
    "m4-shared2-first-dense": ["--experts", "4", "--top-k", "2", "--granularity", "4", "--shared", "2",
                               "--first-dense", "1", "--seed", "3", "--router-std", "1"],
}


def dense_model(model_type: str, seed: int = 0):
    """transformers' own dense model of a family, fp32, eval mode, random weights everywhere (norms and biases
    too, so that a weight read into the wrong place shows)."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **(BASE | FAMILIES[model_type]))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            noise = torch.randn(t.shape, generator=g)
            t.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else noise * (0.1 if t.dim() == 1 else 0.2))
    return model


def _ids(seed=1, length=16):
    return torch.randint(0, BASE["vocab_size"], (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def llama(tmp_path):
    reference = dense_model("llama")
    reference.save_pretrained(tmp_path / "dense")
    return reference, tmp_path / "dense"


# ---- the invariant --------------------------------------------------------------------------------------------


# without shared slices, transformers' GLM-4.5 still builds its shared experts, of width 0 (dsmoe writes no keys for
# them; torch warns as transformers initializes the empty tensors)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_upcycled_folder_computes_the_dense_model(model_type, spec, tmp_path, capsys):
    reference = dense_model(model_type)
    reference.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "chat_template.jinja").write_text("{{ messages }}")
    assert main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), *SPECS[spec]]) == 0
    assert "max |difference|" in capsys.readouterr().out
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "glm4_moe" and config["architectures"] == ["Glm4MoeForCausalLM"]
    assert config["attention_bias"] == (model_type == "qwen2") and config["use_qk_norm"] == (model_type == "qwen3")
    assert config["partial_rotary_factor"] == 1.0 and config["norm_topk_prob"]
    assert config["routed_scaling_factor"] == config["num_experts_per_tok"]
    assert (tmp_path / "moe" / "chat_template.jinja").read_text() == "{{ messages }}"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    ours = from_pretrained(tmp_path / "moe")
    assert ours.cfg.family == "glm4_moe" and ours.cfg.num_params() == sum(p.numel() for p in theirs.parameters())
    with torch.no_grad():
        dense_logits = reference(_ids()).logits
        torch.testing.assert_close(theirs(_ids()).logits, dense_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(_ids())[0], dense_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router_std", [0.02, 0.0], ids=["random-router", "zero-router"])
def test_greedy_decoding_equals_the_dense_models(llama, router_std):
    """Decoding runs one-token forwards (a KV cache): the upcycled model's greedy tokens are the dense model's."""
    dense = from_pretrained(llama[1])
    model = upcycle(dense, UpcycleConfig(experts=8, top_k=2, granularity=3, shared=1, router_std=router_std))
    prompt = _ids(length=5)
    assert torch.equal(model.generate(prompt, 24, temperature=0), dense.generate(prompt, 24, temperature=0))


@pytest.mark.parametrize("router_std", [0.02, 0.0], ids=["random-router", "zero-router"])
def test_each_token_takes_one_copy_of_each_routed_slice_with_weight_one(llama, router_std):
    """Expert r*K + j holds routed slice j: a token's K experts are one replica's K slices, weighted 1 each; a
    random router spreads the tokens over the replicas, a zero one sends them all to replica 0."""
    dense = from_pretrained(llama[1])
    spec = UpcycleConfig(experts=12, top_k=2, granularity=3, shared=1, router_std=router_std)
    model = upcycle(dense, spec)
    replicas_seen = set()
    for layer in model.moe_layers():
        weights_TK, ids_TK, _, _ = layer.gate(torch.randn(256, 32))
        assert torch.equal(ids_TK.remainder(2).sort(dim=1).values, torch.tensor([[0, 1]]).expand(256, 2))
        replica_T = ids_TK[:, 0] // 2
        assert torch.equal(ids_TK // 2, replica_T[:, None].expand(256, 2))
        torch.testing.assert_close(weights_TK, torch.ones(256, 2))
        replicas_seen |= set(replica_T.tolist())
    assert replicas_seen == (set(range(6)) if router_std else {0})


def test_dense_weights_are_copied_and_the_dense_model_is_left_alone(llama):
    dense = from_pretrained(llama[1])
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    model = upcycle(dense, UpcycleConfig(experts=4, top_k=2, granularity=3, shared=1))
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    moe = model.moe_layers()[0]
    ffn = dense.layers[0].ffn
    assert torch.equal(moe.shared_experts.down_proj.weight, ffn.down_proj.weight[:, :16])
    assert torch.equal(moe.experts.w_gate[3], ffn.gate_proj.weight[32:])  # replica 1, routed slice 1 = slice 2
    assert torch.equal(model.layers[1].attn.wq.weight, dense.layers[1].attn.wq.weight)


# ---- Drop-Upcycling -------------------------------------------------------------------------------------------


def _changed_units(expert: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]) -> list[set[int]]:
    """The hidden units of one expert whose gate row, up row, down column differ from the undropped copy."""
    return [set((expert[n] != kept[n]).any(dim=dim).nonzero().flatten().tolist())
            for n, dim in (("w_gate", 1), ("w_up", 1), ("w_down", 0))]


def test_drop_upcycling_redraws_floor_r_f_units_of_every_routed_expert(llama):
    dense = from_pretrained(llama[1])
    spec = UpcycleConfig(experts=8, top_k=2, granularity=3, shared=1, drop=0.5, seed=5)
    dropped, kept = upcycle(dense, spec), upcycle(dense, UpcycleConfig(experts=8, top_k=2, granularity=3, shared=1))
    for a, b in zip(dropped.moe_layers(), kept.moe_layers()):
        assert torch.equal(a.shared_experts.up_proj.weight, b.shared_experts.up_proj.weight)
        sets = []
        for e in range(8):
            gate, up, down = _changed_units({n: getattr(a.experts, n)[e] for n in ("w_gate", "w_up", "w_down")},
                                            {n: getattr(b.experts, n)[e] for n in ("w_gate", "w_up", "w_down")})
            assert gate == up == down and len(gate) == 8  # floor(0.5 * 16), the same units in all three
            sets.append(frozenset(gate))
        assert len(set(sets)) > 1  # each expert its own units
        weights_TK, ids_TK, _, _ = a.gate(torch.randn(64, 32))  # routing as without the drop
        assert torch.equal(ids_TK.remainder(2).sort(dim=1).values, torch.tensor([[0, 1]]).expand(64, 2))
    assert max_logit_difference(dense, dropped) > 1e-3  # the function changed, as the paper intends
    again = upcycle(dense, spec)
    assert all(torch.equal(x, y) for x, y in zip(again.state_dict().values(), dropped.state_dict().values()))


# ---- bad input ------------------------------------------------------------------------------------------------

FLAGS = ["--experts", "8", "--top-k", "2", "--granularity", "3", "--shared", "1"]


def _set(flags: list[str], **changes: str) -> list[str]:
    out = list(flags)
    for flag, value in changes.items():
        out[out.index(f"--{flag.replace('_', '-')}") + 1] = value
    return out


@pytest.mark.parametrize("flags,message", [
    (_set(FLAGS, granularity="5", shared="0", top_k="5", experts="10"),
     "granularity=5 is invalid: must divide the dense FFN width intermediate_size=48"),
    (_set(FLAGS, experts="7"), "experts=7 is invalid: must be a multiple of granularity - shared = 3 - 1 = 2"),
    (_set(FLAGS, shared="3"), "shared=3 is invalid: must be < granularity=3"),
    (_set(FLAGS, top_k="3"), "top_k=3 is invalid: does not fit: each token takes one copy of each of the "
                             "granularity - shared = 2 routed slices, so top_k must be 2"),
    ([*FLAGS, "--drop", "1"], "drop=1.0 is invalid: must be a number in [0, 1)"),
    ([*FLAGS, "--first-dense", "3"], "first_k_dense=3 is invalid: must be < n_layers=3"),
], ids=["width-not-divisible", "experts-not-a-multiple", "shared-not-below-m", "top-k-does-not-fit", "drop-1",
        "no-moe-block"])
def test_bad_flags_are_errors_naming_the_field(llama, flags, message, tmp_path, capsys):
    assert main(["upcycle", str(llama[1]), "--out", str(tmp_path / "moe"), *flags]) == 1
    assert message in capsys.readouterr().out
    assert not (tmp_path / "moe").exists()


def test_an_moe_folder_and_a_used_out_folder_are_refused(llama, tmp_path, capsys):
    glm = transformers.AutoConfig.for_model("glm4_moe", **BASE, n_routed_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=8)
    transformers.AutoModelForCausalLM.from_config(glm).save_pretrained(tmp_path / "glm")
    assert main(["upcycle", str(tmp_path / "glm"), "--out", str(tmp_path / "moe"), *FLAGS]) == 1
    assert "model_type='glm4_moe' is not a dense model upcycle takes; choose a llama, qwen2, qwen3 folder" in \
        capsys.readouterr().out
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert main(["upcycle", str(llama[1]), "--out", str(tmp_path / "used"), *FLAGS]) == 1
    assert "exists and is not an empty folder" in capsys.readouterr().out
    moe = from_pretrained(tmp_path / "glm")
    with pytest.raises(ValueError, match=r"already has MoE blocks \(moe.n_routed_experts=4, family 'glm4_moe'\)"):
        upcycle(moe, UpcycleConfig(experts=8, top_k=2, granularity=3, shared=1))


# ---- a dsmoe-native model: DeepSeek-V3's format --------------------------------------------------------------


def test_a_native_latent_attention_model_upcycles_into_a_deepseek_v3_folder(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=64, moe=None, first_k_dense=2,
                      dense_hidden=48, tie_embeddings=False, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                      v_head_dim=8)
    dense = MoETransformer(cfg).eval()
    model = upcycle(dense, UpcycleConfig(experts=8, top_k=2, granularity=3, shared=1))
    assert model.cfg.family == "" and max_logit_difference(dense, model) < 1e-5
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(_ids()).logits, dense(_ids())[0], atol=1e-5, rtol=1e-5)


# ---- the study ------------------------------------------------------------------------------------------------


def test_the_upcycle_study_arms_start_where_they_should(corpus, tmp_path, one_thread):
    """(a) starts at the dense model's final loss (the invariant, through an HF folder and train --init), (c) too;
    the scratch arms start untrained; every arm's row is complete."""
    model, train_cfg = build_configs("debug", [f"data={corpus}", "batch_size=2", "seq_len=16", "eval_batches=2"])
    studies.study(["upcycle"], model, train_cfg, steps=4, seeds=1, out=tmp_path, log=lambda msg: None)
    rows = {r["arm"]: r for r in json.loads((tmp_path / "upcycle" / "results.json").read_text())["rows"]}
    assert list(rows) == ["pretrain", "upcycled", "scratch", "dense", "scratch-all"]
    end = rows["pretrain"]["val_loss"]["mean"]
    assert rows["upcycled"]["init_val_loss"]["mean"] == pytest.approx(end, abs=1e-4)
    assert rows["dense"]["init_val_loss"]["mean"] == pytest.approx(end, abs=1e-4)
    assert rows["scratch"]["init_val_loss"]["mean"] > end
    assert [rows[a]["steps"] for a in rows] == [4, 6, 2, 6, 6]
    assert rows["upcycled"]["num_active_params"] > rows["dense"]["num_active_params"]  # the router, at most
    assert (tmp_path / "upcycle" / "upcycle.png").is_file()
    assert "(a) upcycled MoE, continued" in (tmp_path / "upcycle" / "results.md").read_text()

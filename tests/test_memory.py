"""Parameter counts and the memory check of a training step (dsmoe.config counts, dsmoe.memory).

Counts equal the built model's, MTP modules included (meta device, small configs), and match DeepSeek's published
totals with the MTP modules left out. The memory check counts what each rank holds under the layout it runs
(FSDP2 shards, experts split over ep, what FSDP2 gathers, batch_size / world sequences): DeepSeek-V2-Lite at
seq_len 4096 on 80 GB is refused in one process and accepted on 8 and 64 ranks.
"""

import dataclasses
from typing import Any

import pytest
import torch

from dsmoe.config import ModelConfig, MoEConfig, TrainConfig
from dsmoe.memory import check_step_memory, gathered_bytes, step_memory
from dsmoe.model import Block, MoETransformer
from dsmoe.moe import MoE
from dsmoe.pretrained import model_config_from_hf

GiB = 2**30
GPU_80GB = 80 * 10**9

# ----------------------------------------------------------------------------- parameter counts

MOE = MoEConfig(dim=32, n_routed_experts=8, n_shared_experts=1, top_k=2, expert_dim=16)
MLA: dict[str, Any] = dict(kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
SMALL = {
    "mla-mtp2": ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=4, moe=MOE, mtp_layers=2,
                            tie_embeddings=False, **MLA),
    "gqa-mtp-tied": ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, moe=MOE, mtp_layers=1),
    "dense-mtp": ModelConfig(vocab_size=64, dim=32, n_layers=2, dense_hidden=48, mtp_layers=1, **MLA),
    # every model block dense, and yet the MTP block is MoE: its layer index is past first_k_dense
    "dense-blocks-moe-mtp": ModelConfig(vocab_size=64, dim=32, n_layers=2, first_k_dense=2, moe=MOE, mtp_layers=1),
    "no-mtp": ModelConfig(vocab_size=64, dim=32, n_layers=3, moe=MOE, **MLA),
}


def built(cfg: ModelConfig) -> MoETransformer:
    with torch.device("meta"):  # counts only: no memory, no init cost
        return MoETransformer(cfg)


def active(model: torch.nn.Module) -> int:
    """Parameters a token touches in training, counted on the module: top_k of each MoE layer's routed experts."""
    idle = sum(sum(p.numel() for p in m.experts.parameters()) // m.cfg.n_routed_experts
               * (m.cfg.n_routed_experts - m.cfg.top_k) for m in model.modules() if isinstance(m, MoE))
    return sum(p.numel() for p in model.parameters()) - idle


@pytest.mark.parametrize("cfg", SMALL.values(), ids=SMALL.keys())
def test_num_params_equal_the_built_model(cfg):
    model = built(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert cfg.num_params(mtp=False) == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert cfg.num_active_params() == active(model)
    assert cfg.num_active_params(mtp=False) == active(model) - active(model.mtp)


# The released config.json values (DeepSeek-V2-Lite, DeepSeek-V2, DeepSeek-V3, Moonlight-16B-A3B)
_MLA = dict(hidden_act="silu", kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            tie_word_embeddings=False)
RELEASES = {
    "v2-lite": _MLA | dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                           moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                           n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                           q_lora_rank=None, topk_method="greedy"),
    "v2": _MLA | dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
                      moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, n_routed_experts=160,
                      n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, q_lora_rank=1536,
                      n_group=8, topk_group=3, topk_method="group_limited_greedy", routed_scaling_factor=16.0),
    "v3": _MLA | dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                      moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, n_routed_experts=256,
                      n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, q_lora_rank=1536,
                      n_group=8, topk_group=4, topk_method="noaux_tc", routed_scaling_factor=2.5,
                      norm_topk_prob=True, scoring_func="sigmoid", num_nextn_predict_layers=1),
    "moonlight": _MLA | dict(model_type="deepseek_v3", vocab_size=163840, hidden_size=2048, intermediate_size=11264,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                             q_lora_rank=None, topk_method="noaux_tc", routed_scaling_factor=2.446,
                             norm_topk_prob=True, scoring_func="sigmoid"),
}
PUBLISHED = {"v2-lite": 15.7e9, "v2": 236e9, "v3": 671e9, "moonlight": 16e9}  # total, MTP modules left out


@pytest.mark.parametrize("name", PUBLISHED, ids=list(PUBLISHED))
def test_published_totals_leave_the_mtp_modules_out(name):
    cfg = model_config_from_hf(RELEASES[name])
    assert cfg.num_params(mtp=False) == pytest.approx(PUBLISHED[name], rel=0.005)


def test_v3_counts_its_mtp_module():
    """DeepSeek-V3 builds 682.6B parameters: 671.0B and an MTP module of 11.6B (a full MoE block, norms and
    eh_proj; the embedding and head are shared). Left out, the memory estimate was 173 GiB of training state
    short."""
    cfg = model_config_from_hf(RELEASES["v3"])
    assert round(cfg.num_params() / 1e9, 1) == 682.6 and round(cfg.num_params(mtp=False) / 1e9, 1) == 671.0
    assert round(16 * (cfg.num_params() - cfg.num_params(mtp=False)) / GiB) == 173
    assert step_memory(cfg, TrainConfig())[0] == 16 * cfg.num_params()


# ----------------------------------------------------------------------------- per rank

V2_LITE = model_config_from_hf(RELEASES["v2-lite"])


def v2_lite_run(world: int, ep: int, per_rank: int = 1) -> TrainConfig:
    return TrainConfig(seq_len=4096, batch_size=world * per_rank, device="cuda", activation_checkpointing=True,
                       expert_parallel=ep if ep > 1 else 0)


def test_v2_lite_is_refused_in_one_process():
    with pytest.raises(ValueError, match=r"needs about 236\.9 GiB .* even batch_size=1 does not fit"):
        check_step_memory(V2_LITE, v2_lite_run(1, 1), available=GPU_80GB)


@pytest.mark.parametrize("world,ep,state_gib", [(8, 8, 29.3), (8, 1, 29.3), (64, 8, 3.7), (64, 64, 3.7)],
                         ids=["8-ep8", "8-dp8", "64-ep8", "64-ep64"])
def test_v2_lite_fits_sharded(world, ep, state_gib):
    """Each rank holds 1/world of the 234 GiB of training state, what FSDP2 gathers (the embedding and head for
    the whole step, ~3.1 GiB with their gradients; one block or two), and its own sequences' activations."""
    train_cfg = v2_lite_run(world, ep)
    check_step_memory(V2_LITE, train_cfg, available=GPU_80GB, world=world, ep=ep)
    whole, per_sequence = step_memory(V2_LITE, train_cfg)
    fixed, per_local_sequence = step_memory(V2_LITE, train_cfg, world=world, ep=ep)
    gathered = gathered_bytes(V2_LITE, V2_LITE.vocab_size, ep)
    assert fixed == -(-whole // world) + gathered
    assert round((fixed - gathered) / GiB, 1) == state_gib
    assert 3.5 * GiB < gathered < 10 * GiB
    assert per_sequence <= per_local_sequence < 1.1 * per_sequence  # + the hidden states received under ep
    assert fixed + per_local_sequence < 45 * GiB


def test_each_rank_counts_its_own_sequences():
    """batch_size is the global batch: on 8 ranks a rank trains on batch_size / 8 sequences, so the largest batch
    accepted is 8 times the sequences that fit on one rank."""
    world, ep = 8, 8
    fixed, per_sequence = step_memory(V2_LITE, v2_lite_run(world, ep), world=world, ep=ep)
    available = fixed + 5 * per_sequence + per_sequence // 2
    check_step_memory(V2_LITE, v2_lite_run(world, ep, per_rank=5), available=available, world=world, ep=ep)
    with pytest.raises(ValueError) as info:
        check_step_memory(V2_LITE, v2_lite_run(world, ep, per_rank=6), available=available, world=world, ep=ep)
    message = str(info.value)
    assert "batch_size=48 is too large" in message and "per rank of 8 (dp 1 x ep 8, 6 sequences each)" in message
    assert "at most 40 (5 per rank)" in message and "FSDP2 gathers" in message


def test_even_one_sequence_per_rank_too_many():
    with pytest.raises(ValueError, match=r"per rank of 64 \(dp 8 x ep 8.*even batch_size=64 \(one sequence per rank"):
        check_step_memory(V2_LITE, v2_lite_run(64, 8), available=8 * GiB, world=64, ep=8)


@pytest.mark.parametrize("name,ep", [("mla-mtp2", 1), ("mla-mtp2", 4), ("dense-blocks-moe-mtp", 8), ("dense-mtp", 1)],
                         ids=["moe", "moe-ep4", "moe-mtp-only-ep8", "dense"])
def test_gathered_bytes_match_the_built_model(name, ep):
    """The root module's parameters (outside every block, MTP's norms and eh_proj included) at 8 bytes, and the
    largest block as one rank gathers it (its routed experts divided over ep) at 12 bytes."""
    cfg = SMALL[name]
    model = built(cfg)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)

    def gathered(block: Block) -> int:
        experts = {id(p) for m in block.modules() if isinstance(m, MoE) for p in m.experts.parameters()}
        return sum(p.numel() // (ep if id(p) in experts else 1) for p in block.parameters())

    assert gathered_bytes(cfg, cfg.vocab_size, ep) == 8 * root + 12 * max(map(gathered, blocks))


def test_the_mtp_modules_add_state_and_activations():
    cfg = SMALL["mla-mtp2"]
    without = dataclasses.replace(cfg, mtp_layers=0)
    for ac in (False, True):
        train_cfg = TrainConfig(seq_len=16, activation_checkpointing=ac)
        (fixed, per_sequence), (fixed0, per_sequence0) = step_memory(cfg, train_cfg), step_memory(without, train_cfg)
        assert fixed == 16 * cfg.num_params() > fixed0 == 16 * without.num_params()
        assert per_sequence > per_sequence0


@pytest.mark.parametrize("world,ep,field", [(0, 1, "world"), (8, 3, "ep"), (8, 0, "ep"), (True, 1, "world")],
                         ids=["no-ranks", "ep-not-dividing", "ep0", "bool"])
def test_bad_layout(world, ep, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        step_memory(V2_LITE, v2_lite_run(8, 1), world=world, ep=ep)


def test_ranks_on_one_host_share_its_memory(monkeypatch):
    """On the CPU the N ranks torchrun starts on a host split its memory; a GPU rank has its own."""
    from dsmoe import memory
    monkeypatch.setattr(memory, "available_memory", lambda device: 64 * 2**30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert memory.rank_memory("cpu") == 16 * 2**30
    assert memory.rank_memory("cuda") == 64 * 2**30


def test_the_document_mask_is_counted():
    """doc_mask keeps a [S, S] bool mask per sequence: seq_len^2 bytes more."""
    from dsmoe.presets import build_configs
    model_cfg, train_cfg = build_configs("tiny", ["seq_len=256"])
    plain = step_memory(model_cfg, train_cfg)[1]
    masked = step_memory(model_cfg, dataclasses.replace(train_cfg, doc_mask=True))[1]
    assert masked - plain == 256 * 256

"""The layout planner (dsmoe.memory.plan, `dsmoe plan`): one engine with step_memory, the pipeline schedules
held to torch's own, DeepSeek-V3's published counts and its own layout, and clear errors for bad input.

Without a pipeline (pp = 1) a layout's GPU is what step_memory and check_step_memory count, to the byte (and
step_memory is held to measured allocated peaks in tests/test_bad_inputs.py). Under a pipeline the micro-batches
each rank holds in flight are those torch.distributed.pipelining's schedules hold, read from their own action
lists. Real pipelined runs on CPU (pp x dp x ep processes) allocate within 15% of the planner's figure on every rank.
"""

import dataclasses
import itertools
import json
import re

import pytest

from dsmoe import cli
from dsmoe.cli.plan import parse_memory
from dsmoe.config import MoEConfig, TrainConfig
from dsmoe.memory import (
    GB,
    LayoutPlan,
    a2a_copies,
    bubble,
    check_step_memory,
    in_flight,
    layout_plan,
    layouts,
    model_units,
    plan,
    split_blocks,
    stage_chunks,
    step_memory,
)
from dsmoe.presets import build_configs
from dsmoe.pretrained import model_config_from_hf

# DeepSeek-V3's config.json, its public values (deepseek-ai/DeepSeek-V3)
V3 = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=7168, num_hidden_layers=61,
          n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1, moe_intermediate_size=2048,
          intermediate_size=18432, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
          qk_nope_head_dim=128, v_head_dim=128, vocab_size=129280, num_attention_heads=128, num_key_value_heads=128,
          n_group=8, topk_group=4, num_nextn_predict_layers=1, topk_method="noaux_tc", scoring_func="sigmoid",
          norm_topk_prob=True, routed_scaling_factor=2.5, hidden_act="silu", tie_word_embeddings=False,
          max_position_embeddings=163840, rope_theta=10000, rms_norm_eps=1e-6,
          rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                            mscale=1.0, mscale_all_dim=1.0))


def find(plans: list[LayoutPlan], pp: int, dp: int, ep: int) -> LayoutPlan:
    return next(p for p in plans if (p.pp, p.dp, p.ep) == (pp, dp, ep))


# ----------------------------------------------------------------------------- one engine

@pytest.mark.parametrize("world,ep", [(1, 1), (4, 1), (4, 2), (4, 4), (8, 2), (8, 8)],
                         ids=["1", "dp4", "dp2-ep2", "ep4", "dp4-ep2", "ep8"])
@pytest.mark.parametrize("ac", [False, True], ids=["no-ac", "ac"])
def test_without_a_pipeline_a_layout_is_what_step_memory_counts(world, ep, ac):
    """plan's GPU of a dp x ep layout = step_memory's fixed + its batch_size / world sequences, the figure
    check_step_memory refuses a run above (the debug preset, cuda and cpu)."""
    for device in ("cuda", "cpu"):
        model_cfg, train_cfg = build_configs("debug", [f"activation_checkpointing={ac}", f"device={device}"])
        fixed, per_sequence = step_memory(model_cfg, train_cfg, world=world, ep=ep)
        need = fixed + -(-train_cfg.batch_size // world) * per_sequence
        p = find(plan(model_cfg, train_cfg, world, 10 * GB, microbatches=1), 1, world // ep, ep)
        assert p.memory.total == need and p.memory.pipeline == 0 and p.bubble == 0
        assert p.memory.activations == (p.memory.activations_ac if ac else p.memory.activations_no_ac)
        check_step_memory(model_cfg, train_cfg, available=need, world=world, ep=ep)
        with pytest.raises(ValueError, match="too large"):
            check_step_memory(model_cfg, train_cfg, available=need - 1, world=world, ep=ep)


def test_the_units_are_the_model():
    """The units' parameters add up to the built model's count, MTP and untied head included (V3), and a stage
    split keeps every unit once."""
    cfg = model_config_from_hf(V3)
    units = model_units(cfg, cfg.vocab_size)
    assert sum(u.params for u in units) == cfg.num_params()
    assert [u.name for u in units[:2]] == ["embedding", "block 0"] and units[-1].name == "mtp 0 block"
    p = layout_plan(cfg, TrainConfig(seq_len=4096, batch_size=2048, device="cuda"), 16, 2, 64)
    assert sum(p.stage_blocks) == 61 and len(p.stage_blocks) == 16 and p.uneven


def test_the_split_is_the_pipelines():
    """The planner splits stages as dsmoe.parallel.pipeline does (by parameters, embedding first, head and MTP
    last), so the memory it plans is the run's."""
    pipeline = pytest.importorskip("dsmoe.parallel.pipeline")
    if not hasattr(pipeline, "split_layers"):
        pytest.skip("dsmoe.parallel.pipeline has no split_layers")
    train_cfg = TrainConfig(seq_len=64, batch_size=4096, device="cuda")
    for cfg in (model_config_from_hf(V3), build_configs("small")[0]):
        for pp in (2, 3, 4, 6):
            planned = layout_plan(cfg, train_cfg, pp, 1, 1).stage_blocks
            assert planned == tuple(map(len, pipeline.split_layers(cfg, pp))), (cfg.n_layers, pp)


SPLITS = {"ends": ((5, 1, 1, 1, 1, 5), 3), "even": ((1,) * 7, 3), "heavy-ends": ((9, 1, 1, 1, 1, 1, 1, 9), 4),
          "one-each": ((3, 3, 3), 3), "one": ((4, 1), 1)}


@pytest.mark.parametrize("weights,n", SPLITS.values(), ids=SPLITS.keys())
def test_the_split_is_the_best_possible(weights, n):
    """The largest chunk is as small as any split into n contiguous non-empty chunks can make it (brute force)."""
    sizes = split_blocks(weights, n)
    assert sum(sizes) == len(weights) and all(s >= 1 for s in sizes) and len(sizes) == n

    def largest(cuts: tuple[int, ...]) -> int:
        bounds = (0, *cuts, len(weights))
        return max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
    bounds = [sum(sizes[:k]) for k in range(1, n)]
    assert largest(tuple(bounds)) == min(largest(c) for c in itertools.combinations(range(1, len(weights)), n - 1))


# ----------------------------------------------------------------------------- the schedules, held to torch's

SCHEDULE_CASES = [("gpipe", 4, 8), ("gpipe", 4, 2), ("1f1b", 4, 4), ("1f1b", 4, 16), ("1f1b", 8, 32),
                  ("interleaved", 4, 16), ("interleaved", 4, 8), ("interleaved", 4, 5), ("interleaved", 4, 2),
                  ("interleaved", 8, 32), ("zb", 4, 16), ("zb", 4, 5), ("zb", 4, 2), ("zb", 8, 32),
                  ("dualpipev", 4, 8), ("dualpipev", 8, 32)]


def torch_in_flight(schedule: str, pp: int, M: int) -> list[list[int]]:
    """Per rank, its chunks' micro-batches in flight when the rank's total first peaks, replayed from the actions
    torch's schedule lists (forward adds one, full or input backward frees one)."""
    visualizer = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")
    from torch.distributed.pipelining.schedules import _ComputationType as C

    from dsmoe.memory import SCHEDULES
    ops = visualizer.get_schedule_ops(SCHEDULES[schedule], pp, M, None if schedule in ("gpipe", "1f1b") else 2)
    out = []
    for r, actions in enumerate(ops):
        live: dict[int, int] = {c: 0 for c in stage_chunks(schedule, pp)[r]}
        peak, at = 0, dict(live)
        for a in filter(None, actions):
            for s in a.sub_actions if a.computation_type == C.OVERLAP_F_B else [a]:
                if s.computation_type == C.FORWARD:
                    live[s.stage_index] += 1
                elif s.computation_type in (C.FULL_BACKWARD, C.BACKWARD_INPUT):
                    live[s.stage_index] -= 1
                if sum(live.values()) > peak:
                    peak, at = sum(live.values()), dict(live)
        out.append([at[c] for c in stage_chunks(schedule, pp)[r]])
    return out


@pytest.mark.parametrize("schedule,pp,M", SCHEDULE_CASES, ids=[f"{s}-pp{p}-M{m}" for s, p, m in SCHEDULE_CASES])
def test_micro_batches_in_flight_are_torchs(schedule, pp, M):
    assert in_flight(schedule, pp, M) == torch_in_flight(schedule, pp, M)


def test_bubbles():
    """1F1B and GPipe (pp-1)/(M+pp-1); interleaved with v chunks a v-th of 1F1B's bubble; ZB-V none; DualPipeV a
    third of 1F1B's; no pipeline, none."""
    assert bubble("1f1b", 4, 12) == bubble("gpipe", 4, 12) == pytest.approx(3 / 15)
    assert bubble("interleaved", 4, 12, 3) == pytest.approx((3 / 36) / (1 + 3 / 36))
    assert bubble("zb", 16, 64) == 0 and bubble("1f1b", 1, 1) == 0
    assert bubble("dualpipev", 16, 64) == pytest.approx((15 / 192) / (1 + 15 / 192))


def test_pipeline_memory_follows_the_schedule():
    """GPipe holds every micro-batch, 1F1B at most pp on the first stage; a V schedule runs 2 x pp chunks, the
    first and the last (embedding and head) on rank 0, one process a stage (torch's weight pass and FSDP2 do not
    compose in dsmoe's stages); receive buffers are one per micro-batch, so they grow with
    the sequences a rank trains on, however many micro-batches carry them."""
    cfg = model_config_from_hf(V3)
    train_cfg = TrainConfig(seq_len=4096, batch_size=2048, device="cuda", activation_checkpointing=True)
    one_f, gpipe = (layout_plan(cfg, train_cfg, 16, 2, 64, s) for s in ("1f1b", "gpipe"))
    assert one_f.microbatches == 16 and gpipe.memory.pipeline > one_f.memory.pipeline
    assert stage_chunks("zb", 4) == [[0, 7], [1, 6], [2, 5], [3, 4]]
    zb = layout_plan(cfg, train_cfg, 16, 2, 64, "zb")
    assert len(zb.stage_blocks) == 32 and zb.bubble == 0
    assert "FSDP2" in zb.problem and "activation checkpointing" in layout_plan(cfg, train_cfg, 16, 1, 1, "zb").problem
    no_ac = dataclasses.replace(train_cfg, activation_checkpointing=False)
    assert not layout_plan(cfg, no_ac, 16, 1, 1, "zb").problem  # a stage a process, without recomputation
    doubled = layout_plan(cfg, dataclasses.replace(train_cfg, batch_size=4096), 16, 2, 64, microbatches=16)
    assert doubled.micro_batch == 2 and doubled.memory.pipeline > one_f.memory.pipeline


def test_all_to_all_copies():
    """dsmoe sends a token once per rank that holds one of its experts: at most top_k and ep, and with the group
    limit at most the ranks of topk_groups groups."""
    v3 = MoEConfig(dim=8, n_routed_experts=256, top_k=8, n_groups=8, topk_groups=4)
    assert [a2a_copies(v3, ep) for ep in (1, 4, 8, 16, 64)] == [0, 4, 4, 8, 8]
    assert [a2a_copies(v3, ep, limited=False) for ep in (1, 4, 8, 16, 64)] == [0, 4, 8, 8, 8]
    v2 = MoEConfig(dim=8, n_routed_experts=160, top_k=6, n_groups=8, topk_groups=3)  # device-limited: M = 3 of 8
    assert a2a_copies(v2, 8) == 3 and a2a_copies(v2, 8, limited=False) == 6
    assert a2a_copies(None, 8) == 0


def test_the_gradients_a_pipeline_rank_holds_at_its_peak():
    """GPipe's ranks peak in their first backward, before their stage's gradients (one block's being made at
    most); 1F1B's last rank peaks again after a backward, holding its stage's; with grad_accum every rank holds all
    of them; under torch's FSDP2 they are unsharded, in what it gathers. A split backward (zb) keeps one chunk's
    weight-gradient inputs on top of the activations."""
    from dsmoe import memory

    model_cfg, train_cfg = build_configs("tiny", ["n_layers=4", "vocab_size=260", "device=cpu", "batch_size=16",
                                                  "seq_len=64"])
    block = max(u.params for u in model_units(model_cfg, 260) if u.block)
    gpipe = layout_plan(model_cfg, train_cfg, 2, 1, 1, "gpipe", 4)
    assert all(r.grads <= 4 * block < r.params for r in gpipe.ranks) and gpipe.memory == gpipe.ranks[gpipe.peak_stage]
    assert layout_plan(model_cfg, train_cfg, 2, 1, 1, "1f1b", 4).ranks[1].grads >= gpipe.ranks[1].params
    assert all(r.grads == r.params for r in layout_plan(model_cfg, train_cfg, 2, 1, 1, "gpipe", 4,
                                                          accumulate=True).ranks)
    fsdp = layout_plan(model_cfg, train_cfg, 2, 2, 1, "1f1b", 4)
    assert all(r.grads == 0 and r.gathered > 4 * r.params for r in fsdp.ranks)
    run = memory._run(model_cfg, train_cfg)
    chunk = model_units(model_cfg, 260)[:3]  # the embedding and two blocks
    extra = memory._activations(dataclasses.replace(run, split_backward=True), [(chunk, 1, 2)]) \
        - memory._activations(run, [(chunk, 1, 2)])
    assert extra == sum(u.weight_grads for u in chunk) * 64 * 4 > 0


MEASURED = [((1, 1, 1), "1f1b", 1), ((2, 1, 1), "1f1b", 2), ((2, 1, 1), "gpipe", 4), ((2, 1, 1), "zb", 2),
            ((2, 1, 2), "1f1b", 2), ((2, 2, 1), "interleaved", 2)]


@pytest.mark.slow
@pytest.mark.parametrize("layout,schedule,M", MEASURED,
                         ids=[f"pp{a}xdp{b}xep{c}-{s}-M{m}" for (a, b, c), s, m in MEASURED])
def test_the_plan_holds_real_runs(layout, schedule, M):
    """Every rank's peak allocated memory in two training steps of a real run (dsmoe bench pp's measurement: the
    tiny preset, 4 blocks, 32 x 128 tokens, gloo) within 15% of the planner's figure for that rank."""
    from dsmoe.bench import pp as bench

    if bench.allocated() is None:
        pytest.skip("the allocated memory is read from glibc (mallinfo2)")
    pp, dp, ep = layout
    settings = bench.PipelineSettings(preset="tiny", layers=4, batch_size=32, seq_len=128, repeats=1, warmup=0,
                                      dp=dp, ep=ep)
    row = bench.measure_one(settings, pp, schedule, M)
    ratios = [planned / measured for planned, measured in zip(row["planner_mb"], row["allocated_mb"])]
    assert len(ratios) == pp * dp * ep and all(0.85 <= r <= 1.15 for r in ratios), (ratios, row)


# ----------------------------------------------------------------------------- DeepSeek-V3

def test_deepseek_v3_published_counts_and_its_own_layout(capsys):
    """671B parameters and 37B active without the MTP module, as published; on 2048 GPUs of 80 GB the plan holds
    DeepSeek's own layout, 16-way PP x 64-way EP x 2-way DP (theirs was ZeRO-1; dsmoe shards with FSDP2)."""
    cfg = model_config_from_hf(V3)
    assert round(cfg.num_params(mtp=False) / 1e9) == 671
    assert cfg.num_active_params(mtp=False) == pytest.approx(37e9, rel=0.02)  # 37.6B: dsmoe counts the embedding
    train_cfg = TrainConfig(seq_len=4096, batch_size=8 * 2048, device="cuda", activation_checkpointing=True)
    theirs = find(plan(cfg, train_cfg, 2048, 80 * GB), 16, 2, 64)
    m = theirs.memory
    with capsys.disabled():  # where it lands, in the test log
        print(f"\nDeepSeek-V3 at pp 16 x dp 2 x ep 64 on 80 GB GPUs: {m.total / GB:.1f} GB on stage "
              f"{theirs.peak_stage}'s GPUs (weights {m.params / GB:.1f}, gradients {m.grads / GB:.1f}, AdamW "
              f"{m.adamw / GB:.1f}, gathered {m.gathered / GB:.1f}, activations {m.activations / GB:.1f}, pipeline "
              f"{m.pipeline / GB:.1f}), "
              f"{(80 * GB - m.total) / GB:.1f} GB free; blocks per stage {theirs.stage_blocks}")
    assert 40 * GB < m.total < 80 * GB and theirs.a2a_token == (8 * 7168 * 4, 8 * 7168 * 4)


def test_cli_prints_the_table(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(V3))
    assert cli.main(["plan", str(tmp_path / "config.json"), "--gpus", "2048", "--top", "3", "--show", "16x2x64"]) == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())  # the header is wrapped
    assert "682.6B parameters (671.0B without MTP)" in text and "AdamW" in out and "GB = 10^9 bytes" in text
    rows = [line for line in out.splitlines() if re.match(r"\s*(\d+|-)\s+\d+ x \d+ x \d+\s", line)]
    assert len(rows) == 4 and "16 x 2 x 64" in rows[-1]
    assert "uneven" in text and "head and MTP on the last" in text


def test_a_preset_and_a_folder_plan_alike(tmp_path, capsys):
    assert cli.main(["plan", "debug", "--gpus", "4", "--gpu-memory", "1GB"]) == 0
    assert "memory per GPU in MB" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv,message", [
    (["--gpus", "0"], "--gpus 0 is invalid: must be an integer >= 1"),
    (["--gpus", "-8"], "--gpus -8 is invalid"),
    (["--gpus", "8", "--gpu-memory", "80XB"], "--gpu-memory '80XB' is not a memory size"),
    (["--gpus", "8", "--gpu-memory", "0GB"], "is not a memory size"),
    (["--gpus", "8", "--show", "16by2"], "--show '16by2' is not a layout"),
    (["--gpus", "8", "--microbatches", "0"], "--microbatches 0 is invalid"),
], ids=["gpus-0", "gpus-negative", "memory-unit", "memory-0", "show", "microbatches-0"])
def test_bad_options(argv, message, capsys):
    assert cli.main(["plan", "debug", *argv]) == 1
    assert message in capsys.readouterr().out


def test_no_layout_fits_names_the_smallest(tmp_path, capsys):
    """DeepSeek-V3 on 8 GPUs: refused, with the least memory any layout would need."""
    (tmp_path / "config.json").write_text(json.dumps(V3))
    assert cli.main(["plan", str(tmp_path), "--gpus", "8", "--gpu-memory", "80GB"]) == 1
    out = capsys.readouterr().out
    cfg = model_config_from_hf(V3)
    least = min(p.memory.total for p in layouts(cfg, TrainConfig(seq_len=4096, batch_size=64, device="cuda",
                                                                 activation_checkpointing=True), 8))
    assert f"the smallest needs {least / GB:.1f} GB per GPU" in out and "fits in 80.0 GB" in out
    assert least > 80 * GB and "the training state alone (16 B a parameter) needs at least 137 such GPUs" in out


def test_no_layout_can_run(capsys):
    """A global batch smaller than the data-parallel ranks of every layout: each layout's reason."""
    assert cli.main(["plan", "debug", "--gpus", "8", "--global-batch", "1", "--microbatches", "2"]) == 1
    assert "can run this model and batch" in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    ({"model_type": "gpt2", "hidden_size": 8}, "model_type='gpt2' is not supported"),
    (["not", "an", "object"], "must hold a JSON object"),
    ("{not json", "is not valid JSON"),
], ids=["gpt2", "list", "not-json"])
def test_a_config_that_is_not_a_supported_model(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert cli.main(["plan", str(path), "--gpus", "8"]) == 1
    out = capsys.readouterr().out
    assert message in out and str(path) in out


def test_neither_a_file_nor_a_preset(capsys):
    assert cli.main(["plan", "no-such-model", "--gpus", "8"]) == 1
    assert "neither a config.json, a folder holding one, nor a preset" in capsys.readouterr().out


@pytest.mark.parametrize("text,expected", [("80GB", 80 * 10**9), ("80", 80 * 10**9), ("141 gb", 141 * 10**9),
                                           ("96GiB", 96 * 2**30), ("1.5TB", 1.5e12), ("81920MiB", 80 * 2**30)])
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


def test_plan_arguments_are_checked():
    model_cfg, train_cfg = build_configs("debug")
    for kwargs, field in ((dict(gpus=0), "gpus"), (dict(gpus=4, schedule="1F1B"), "schedule"),
                          (dict(gpus=4, microbatches=0), "microbatches")):
        with pytest.raises(ValueError, match=f"^{field}="):
            layouts(model_cfg, train_cfg, **kwargs)
    assert all(0 <= p.bubble < 1 for p in layouts(model_cfg, train_cfg, 4))

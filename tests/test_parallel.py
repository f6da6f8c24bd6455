"""Expert parallelism (dsmoe.parallel) on CPU with gloo, 2 and 4 processes started here.

The expert-parallel layer equals the single-process layer on the same global batch (outputs, input
gradients, every expert's weight gradients, router and shared-expert gradients) for softmax and sigmoid
gates, with and without device-limited routing, with uneven batches, an empty batch and ranks that
receive no token; device limit M bounds the ranks a token reaches and cuts the measured volume; the
dispatch counts are the placement the communication balance loss counts; checkpoints gathered at one
world size load at another (4 -> 2, 2 -> 4, 2 -> 1); a hung or dead rank makes the others fail within
the process-group timeout. Each world size is spawned once per group of cases, to keep the file fast.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dsmoe import MoE, MoEConfig, balancing, cli
from dsmoe.parallel import (
    MeshContext,
    apply_expert_parallel,
    comm_stats,
    expert_parameter_names,
    full_state_dict,
    global_view,
    load_full_state_dict,
)
from dsmoe.parallel.comm import end_process_groups

pytestmark = pytest.mark.slow  # multi-process or end-to-end: the slow tier

# --------------------------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, out_dir, timeout_s):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    result = fn(rank, world)
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    if fn is not fault_worker:  # the fault cases leave a broken group behind on purpose
        end_process_groups()


def launch(fn, world: int, tmp_path, timeout_s: float = 60.0) -> list:
    """Run fn(rank, world) in `world` fresh processes; returns each rank's JSON result (None: it wrote none)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, str(tmp_path), timeout_s)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
    paths = [tmp_path / f"{r}.json" for r in range(world)]
    return [json.loads(p.read_text()) if p.exists() else None for p in paths]


def run_cases(cases: dict, rank: int, world: int) -> dict[str, str]:
    """Run each case, catching its failure, so that one spawn checks many cases."""
    errors = {}
    for name, case in cases.items():
        try:
            case(rank, world)
            errors[name] = ""
        except Exception:
            errors[name] = traceback.format_exc()
    return errors


# --------------------------------------------------------------------------------------------- layer cases

E, D, F, K = 8, 8, 12, 3


def make_cfg(world, **kw) -> MoEConfig:
    return MoEConfig(**{**dict(dim=D, expert_dim=F, n_routed_experts=E, n_shared_experts=1, top_k=K), **kw})


def token_counts(world, kind) -> list[int]:
    return {"even": [6] * world, "uneven": [3 + 2 * r for r in range(world)],
            "empty": [0 if r == 1 else 5 for r in range(world)]}[kind]


def check_equal_to_single_process(rank, world, cfg, batch="even", bias_to_rank0=False, seed=0):
    """EP on each rank's slice of a global batch == the single-process layer on the whole batch."""
    torch.manual_seed(seed)
    ref = MoE(cfg)
    with torch.no_grad():
        ref.gate.bias.normal_(0, 0.05)
        if bias_to_rank0:  # every token picks rank 0's experts: the other ranks receive nothing
            ref.gate.bias[: E // world] += 10.0
    counts = token_counts(world, batch)
    x = torch.randn(sum(counts), D)
    g = torch.randn(sum(counts), D)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])

    ep = apply_expert_parallel(copy.deepcopy(ref))
    x_ref = x.clone().requires_grad_(True)
    (ref(x_ref) * g).sum().backward()
    x_loc = x[lo:hi].clone().requires_grad_(True)
    y_loc = ep(x_loc)
    (y_loc * g[lo:hi]).sum().backward()

    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_loc, ref(x)[lo:hi], **close)
    torch.testing.assert_close(x_loc.grad, x_ref.grad[lo:hi], **close)
    block = ep.experts.expert_range
    for w in ("w_gate", "w_up", "w_down"):  # expert gradients stay local and are complete there
        torch.testing.assert_close(getattr(ep.experts, w).grad, getattr(ref.experts, w).grad[block.start:block.stop],
                                   **close, msg=lambda m, w=w: f"{w}: {m}")
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():  # replicated: each rank holds its tokens' share of the gradient
        if "experts.w_" in name and "shared" not in name:
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, ref_params[name].grad, **close, msg=lambda m, name=name: f"{name}: {m}")

    # the dispatch is the real placement the comm balance loss counts (groups == devices)
    stats = ep.experts
    ids_TK = ep.gate(x_loc.detach())[1]
    sent_TR = torch.zeros(hi - lo, world, dtype=torch.bool).scatter_(1, ids_TK // (E // world), True)
    assert stats.sent_tokens_R.tolist() == sent_TR.sum(0).tolist()
    recv = torch.stack([torch.zeros(world, dtype=torch.long)] * world)
    recv[rank] = stats.recv_tokens_R
    dist.all_reduce(recv)
    sent = torch.zeros_like(recv)
    sent[rank] = stats.sent_tokens_R
    dist.all_reduce(sent)
    assert torch.equal(sent, recv.T), "tokens sent r->s must equal tokens received by s from r"
    if cfg.n_groups == world:
        assert stats.max_ranks_per_token <= cfg.topk_groups
        assert int(stats.sent_tokens_R.sum()) <= cfg.topk_groups * (hi - lo)
    if bias_to_rank0 and rank > 0:
        assert int(stats.recv_tokens_R.sum()) == 0


def layer_cases(world):
    M = world // 2
    return {
        "softmax-unlimited": lambda r, w: check_equal_to_single_process(r, w, make_cfg(w)),
        "sigmoid-unlimited-uneven": lambda r, w: check_equal_to_single_process(
            r, w, make_cfg(w, score_func="sigmoid", norm_topk_prob=True, route_scale=2.5), batch="uneven"),
        f"softmax-limit{M}": lambda r, w: check_equal_to_single_process(
            r, w, make_cfg(w, n_groups=w, topk_groups=M, top_k=min(K, M * E // w))),
        f"sigmoid-top2-limit{M}-uneven": lambda r, w: check_equal_to_single_process(
            r, w, make_cfg(w, score_func="sigmoid", norm_topk_prob=True, route_scale=2.5, n_groups=w, topk_groups=M,
                           group_score="top2", top_k=min(K, M * E // w)), batch="uneven"),
        "sigmoid-limit1-subdevice-groups": lambda r, w: check_equal_to_single_process(
            r, w, make_cfg(w, score_func="sigmoid", n_groups=2 * w if E % (2 * w) == 0 else w, topk_groups=1,
                           top_k=1)),
        "softmax-rank-receives-nothing": lambda r, w: check_equal_to_single_process(
            r, w, make_cfg(w, top_k=min(K, E // w)), bias_to_rank0=True),
        "sigmoid-rank-with-empty-batch": lambda r, w: check_equal_to_single_process(
            r, w, make_cfg(w, score_func="sigmoid", n_groups=w, topk_groups=1, top_k=min(K, E // w)), batch="empty"),
        "volume-drops-with-device-limit": check_volume_drops,
        "comm-loss-on-real-placement": check_comm_loss,
        "rejects-bad-layouts": check_rejects_bad_layouts,
    }


def check_rejects_bad_layouts(rank, world):
    with pytest.raises(ValueError, match="divisible"):
        apply_expert_parallel(MoE(make_cfg(world, n_routed_experts=2 * world + 1, top_k=2)))
    with pytest.raises(ValueError, match="divisor"):
        apply_expert_parallel(MoE(make_cfg(world, n_routed_experts=3 * world, n_groups=3, topk_groups=3)))


def check_volume_drops(rank, world):
    """Same weights and tokens: tokens leave for fewer ranks and fewer bytes move with M = 1."""
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(rank))
    volume = {}
    for M in (1, world):
        torch.manual_seed(0)
        layer = apply_expert_parallel(MoE(make_cfg(world, n_groups=world, topk_groups=M, top_k=E // world)))
        layer(x)
        stats = torch.tensor([comm_stats(layer)["a2a_bytes"], comm_stats(layer)["tokens_sent"]], dtype=torch.float)
        dist.all_reduce(stats)
        volume[M] = stats
        assert comm_stats(layer)["max_ranks_per_token"] <= M
    assert (volume[1] < volume[world]).all(), volume


def check_comm_loss(rank, world):
    """The layer's comm balance loss counts exactly the tokens the dispatch sends to each rank."""
    torch.manual_seed(0)
    layer = apply_expert_parallel(MoE(make_cfg(world, n_groups=world, topk_groups=1, top_k=2, comm_loss_alpha=0.02)))
    x = torch.randn(16, D)
    layer(x)
    weights, ids, scores, _ = layer.gate(x)
    sent = layer.experts.sent_tokens_R.float()
    f_R = sent * (world / (1 * x.shape[0]))
    expected = (f_R * scores.mean(0).view(world, -1).sum(-1)).sum()
    torch.testing.assert_close(layer.losses["comm"], expected)
    torch.testing.assert_close(balancing.comm_balance_loss(scores, ids, world, 1), expected)


def layer_worker(rank, world):
    return run_cases(layer_cases(world), rank, world)


# --------------------------------------------------------------------------------------------- checkpoints


def _model(world, seed):
    torch.manual_seed(seed)
    cfg = make_cfg(world, n_groups=world, topk_groups=world // 2)
    return nn.Sequential(MoE(cfg), MoE(cfg))


def check_checkpoint_reshard(rank, world):
    """Gather at 2 ranks -> load at 4 and at 1; gather at 4 -> load at 2. Same outputs, every expert once."""
    assert world == 4
    full = _model(world, seed=0)
    x = torch.randn(24, D, generator=torch.Generator().manual_seed(1))
    y_full = full(x).detach()
    sub, _ = dist.new_subgroups(group_size=2)
    sub_rank = dist.get_rank(sub)
    at2 = apply_expert_parallel(copy.deepcopy(full), group=sub)
    sd2 = full_state_dict(at2)
    assert sd2.keys() == full.state_dict().keys()
    for k, v in full.state_dict().items():
        assert torch.equal(sd2[k], v), f"{k} differs after gathering"

    at4 = apply_expert_parallel(_model(world, seed=5))  # different init: everything must come from sd2
    load_full_state_dict(at4, sd2)
    torch.testing.assert_close(at4(x[6 * rank: 6 * rank + 6]), y_full[6 * rank: 6 * rank + 6], atol=1e-5, rtol=1e-5)
    at1 = _model(world, seed=6)
    load_full_state_dict(at1, sd2)
    torch.testing.assert_close(at1(x), y_full, atol=1e-5, rtol=1e-5)

    sd4 = full_state_dict(at4)
    back2 = apply_expert_parallel(_model(world, seed=7), group=sub)
    load_full_state_dict(back2, sd4)
    half = slice(12 * sub_rank, 12 * sub_rank + 12)
    torch.testing.assert_close(back2(x[half]), y_full[half], atol=1e-5, rtol=1e-5)
    bad = {k: v[:2] if k.endswith("w_up") else v for k, v in sd4.items()}
    with pytest.raises(ValueError, match="experts"):
        load_full_state_dict(back2, bad)


def check_mesh_grads(rank, world):
    """dp 2 x ep 2: FSDP2 + expert parallelism on each rank's share of the batch, then the context's reduce_grads,
    give every parameter (as its whole tensor) the gradient of one process on the whole batch; the clipped norm is
    the whole model's; each non-expert parameter is a quarter on each rank."""
    assert world == 4
    torch.manual_seed(0)
    cfg = make_cfg(world, n_groups=2, topk_groups=1, top_k=2)
    ref = nn.Sequential(nn.Linear(D, D), MoE(cfg))
    ctx = MeshContext(2, 2)
    sharded = ctx.shard(copy.deepcopy(ref))
    x = torch.randn(8 * world, D, generator=torch.Generator().manual_seed(3))
    ref(x).square().mean().backward()
    sharded(x[8 * rank: 8 * rank + 8]).square().mean().backward()
    ctx.reduce_grads(sharded)
    experts = expert_parameter_names(sharded)
    ref_params = dict(ref.named_parameters())
    for name, p in sharded.named_parameters():
        whole = global_view(p.grad, experts.get(name), ctx.mesh).full_tensor()
        torch.testing.assert_close(whole, ref_params[name].grad, atol=1e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
        if name not in experts:  # FSDP2 over every rank: at most a quarter of the rows here
            assert p.to_local().shape[0] <= -(-p.shape[0] // world), name
    assert set(experts) == {f"1.experts.{w}" for w in ("w_gate", "w_up", "w_down")}
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    torch.testing.assert_close(ctx.clip_grad_norm_(sharded, 0.5), expected)
    for name, p in sharded.named_parameters():
        whole = global_view(p.grad, experts.get(name), ctx.mesh).full_tensor()
        torch.testing.assert_close(whole, ref_params[name].grad, atol=1e-6, rtol=1e-5)


def check_local_batch(rank, world):
    """Each rank takes its contiguous slice of the global batch; a batch the ranks cannot share is refused."""
    local_batch = MeshContext(world // 2, 2).local_batch
    (x,) = local_batch(torch.arange(2 * world))
    assert x.tolist() == [2 * rank, 2 * rank + 1]
    try:
        local_batch(torch.arange(world + 1))
    except ValueError as e:
        assert f"batch_size={world + 1}" in str(e) and f"{world} ranks" in str(e)
    else:
        raise AssertionError("an indivisible batch must be refused")


def misc_worker(rank, world):
    cases = {"checkpoint-2-to-4-to-1-and-4-to-2": check_checkpoint_reshard, "mesh-grads": check_mesh_grads,
             "local-batch": check_local_batch}
    return run_cases(cases, rank, world)


# --------------------------------------------------------------------------------------------- faults

FAULT_TIMEOUT_S = 3.0


def fault_worker(rank, world):
    """Rank 1 hangs (sleeps) or dies before the first all-reduce; rank 0 must raise within the timeout."""
    mode = os.environ["DSMOE_FAULT"]
    if rank == 1:
        if mode == "die":
            os._exit(0)
        time.sleep(3 * FAULT_TIMEOUT_S)
        return {}
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        return {"raised": False}
    except Exception as e:  # gloo raises RuntimeError / DistBackendError
        return {"raised": True, "seconds": time.monotonic() - start, "error": str(e)[:300]}


# --------------------------------------------------------------------------------------------- tests

_RESULTS: dict = {}


def _results(kind, world, tmp_path_factory):
    key = (kind, world)
    if key not in _RESULTS:
        worker = {"layer": layer_worker, "misc": misc_worker}[kind]
        per_rank = launch(worker, world, tmp_path_factory.mktemp(f"{kind}{world}"))
        assert None not in per_rank, f"a rank crashed: {per_rank}"
        _RESULTS[key] = {case: "\n".join(f"rank {r}: {res[case]}" for r, res in enumerate(per_rank) if res[case])
                         for case in per_rank[0]}
    return _RESULTS[key]


LAYER_CASES = [(w, c) for w in (2, 4) for c in layer_cases(w)]


@pytest.mark.parametrize("world,case", LAYER_CASES, ids=[f"{w}ranks-{c}" for w, c in LAYER_CASES])
def test_expert_parallel_layer(world, case, tmp_path_factory):
    error = _results("layer", world, tmp_path_factory)[case]
    assert not error, error


@pytest.mark.parametrize("case", ["checkpoint-2-to-4-to-1-and-4-to-2", "mesh-grads", "local-batch"])
def test_checkpoints_and_grads(case, tmp_path_factory):
    error = _results("misc", 4, tmp_path_factory)[case]
    assert not error, error


@pytest.mark.parametrize("mode", ["hang", "die"])
def test_fault_fails_within_timeout(mode, tmp_path, monkeypatch):
    monkeypatch.setenv("DSMOE_FAULT", mode)
    start = time.monotonic()
    result = launch(fault_worker, 2, tmp_path, timeout_s=FAULT_TIMEOUT_S)[0]
    assert result["raised"], "rank 0 must fail, not hang"
    assert result["seconds"] < 4 * FAULT_TIMEOUT_S, result
    assert time.monotonic() - start < 60


def test_apply_rejects_bad_layouts():
    """Validation needs only the world size: a 1-rank gloo group in this process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        layer = apply_expert_parallel(MoE(make_cfg(1)))
        with pytest.raises(TypeError, match="already applied"):
            apply_expert_parallel(layer)
        with pytest.raises(ValueError, match="capacity_factor"):
            apply_expert_parallel(MoE(make_cfg(1, capacity_factor=1.0)))
        with pytest.raises(ValueError, match="reference"):
            apply_expert_parallel(MoE(make_cfg(1), reference=True))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- training

TRAIN_SETS = ["seq_len=16", "batch_size=4", "eval_batches=2", "eval_every=0", "save_every=2", "log_every=1",
              "warmup_steps=2", "tensorboard=false", "steps=4", "moe.n_groups=2", "moe.topk_groups=1"]


def train_worker(rank, world):
    """`dsmoe train` in this process group (--expert-parallel from DSMOE_EP, 0 = plain data parallel; more
    settings from DSMOE_SETS); returns every layer's bias and this rank's share of the non-expert weights."""
    from dsmoe.parallel import context
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    models = []
    shard = context.MeshContext.shard
    context.MeshContext.shard = lambda self, model: models.append(shard(self, model)) or models[-1]
    sets = TRAIN_SETS + [f"out={os.environ['DSMOE_RUN']}", f"expert_parallel={os.environ.get('DSMOE_EP', world)}"]
    preset = os.environ.get("DSMOE_PRESET", "debug")
    train(*build_configs(preset, sets + os.environ.get("DSMOE_SETS", "").split()), progress=False)
    model = models[0]
    experts = expert_parameter_names(model)
    non_expert = [p for name, p in model.named_parameters() if name not in experts]
    return {"bias": [layer.gate.bias.tolist() for layer in model.moe_layers()],
            "local_numel": sum(p.to_local().numel() for p in non_expert), "numel": sum(p.numel() for p in non_expert)}


def eval_worker(rank, world):
    """The checkpoint in DSMOE_RUN, loaded whole, laid out over ep = world, evaluated like the training run."""
    from dsmoe.checkpoint import load_checkpoint
    from dsmoe.data import load_corpus
    from dsmoe.evaluate import evaluate

    model, _, train_cfg, tokenizer = load_checkpoint(os.environ["DSMOE_RUN"])
    ctx = MeshContext(1, world)
    model = ctx.shard(model)
    corpus = load_corpus(None, tokenizer)
    windows = []
    model.register_forward_pre_hook(lambda module, args: windows.append(len(args[0])))
    ev = evaluate(model, corpus, train_cfg.batch_size, train_cfg.seq_len, train_cfg.eval_batches, ctx=ctx)
    return {**ev, "windows": sum(windows), "all_windows": train_cfg.batch_size * train_cfg.eval_batches}


def _cut_at_step_3():
    """A Ctrl-C (a real SIGINT) at the third Corpus.sample call: step 3 finishes and the run stops at its log
    point with a checkpoint of step 3."""
    import signal

    from dsmoe.data import Corpus

    real, calls = Corpus.sample, []

    def batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    Corpus.sample = batch
    return real


def resume_worker(rank, world):
    """Resume the run in DSMOE_RUN on `world` ranks (--expert-parallel DSMOE_EP, default world; more settings from
    DSMOE_SETS); with DSMOE_CUT set, train it from scratch and stop at step 3 instead."""
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    sets = TRAIN_SETS + [f"out={os.environ['DSMOE_RUN']}", f"expert_parallel={os.environ.get('DSMOE_EP', world)}",
                         *os.environ.get("DSMOE_SETS", "").split()]
    if not os.environ.get("DSMOE_CUT"):
        train(*build_configs("debug", sets + [f"resume={os.environ['DSMOE_RUN']}"]), progress=False)
        return {}
    _cut_at_step_3()
    try:
        train(*build_configs("debug", sets), progress=False)
    except KeyboardInterrupt:
        return {"interrupted": True}
    return {"interrupted": False}


def disagreeing_worker(rank, world):
    """Rank 1 launched with another lr and another --out: every rank's error, or None if it trained."""
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    sets = TRAIN_SETS + [f"out={os.environ['DSMOE_RUN']}-{rank}", f"lr={1e-3 * (rank + 1)}"]
    try:
        train(*build_configs("debug", sets), progress=False)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def ctrl_c_worker(rank, world):
    """Rank 0 alone gets a Ctrl-C (a real SIGINT) in the middle of step 3's update; returns whether this rank
    stopped with KeyboardInterrupt."""
    import signal

    from dsmoe.model import MoETransformer
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    real, calls = MoETransformer.update_biases, []

    def update_biases(self, *args, **kwargs):
        calls.append(1)
        if rank == 0 and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    MoETransformer.update_biases = update_biases
    try:
        train(*build_configs("debug", TRAIN_SETS + [f"out={os.environ['DSMOE_RUN']}", f"expert_parallel={world}"]),
              progress=False)
    except KeyboardInterrupt:
        return {"interrupted": True, "handler_restored": signal.getsignal(signal.SIGINT) is signal.default_int_handler}
    return {"interrupted": False}


def _train_rows(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r["loss"] for r in rows if r["kind"] == "train"], [r["val_loss"] for r in rows if r["kind"] == "eval"]


def _single_biases(run_dir):
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "checkpoint" / "model.safetensors"))
    return [weights[k] for k in sorted((k for k in weights if k.endswith(".gate.bias")),
                                       key=lambda k: int(k.split(".")[1]))]


@pytest.mark.parametrize("layout", ["dp2xep2", "dp2", "dp2xep2-activation-checkpointing"])
def test_mesh_training_equals_single_process(layout, tmp_path, monkeypatch):
    """Same global batch, 6 steps: dp 2 x ep 2 (4 processes, also with activation checkpointing) and dp 2 (2
    processes, an MLA model) give the single-process losses and biases, the same on every rank; each rank holds a
    1/N shard of the non-expert weights; the sharded checkpoint evaluates alike in one process and at ep 4, and
    the MLA run ends as a HuggingFace folder with its weights."""
    from dsmoe.checkpoint import load_checkpoint
    from dsmoe.data import load_corpus
    from dsmoe.evaluate import evaluate
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    world, ep = {"dp2xep2": (4, 2), "dp2": (2, 0), "dp2xep2-activation-checkpointing": (4, 2)}[layout]
    # dp 2 trains an MLA model with V3's group scores: its run ends as a HuggingFace folder
    preset, extra = ("debug-mla", ["moe.group_score=top2"]) if layout == "dp2" else ("debug", [])
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DSMOE_PRESET", preset)
    model_cfg, train_cfg = build_configs(preset, TRAIN_SETS + extra + ["steps=6", f"out={tmp_path / 'single'}"])
    train(model_cfg, train_cfg, progress=False)
    monkeypatch.setenv("DSMOE_RUN", str(tmp_path / "mesh"))
    monkeypatch.setenv("DSMOE_EP", str(ep))
    monkeypatch.setenv("DSMOE_SETS", " ".join(["steps=6", *extra] + (["activation_checkpointing=true"]
                                                                   if "activation" in layout else [])))
    per_rank = launch(train_worker, world, tmp_path / "results")
    assert None not in per_rank, "a rank crashed"

    single_loss, single_val = _train_rows(tmp_path / "single")
    mesh_loss, mesh_val = _train_rows(tmp_path / "mesh")
    assert len(mesh_loss) == len(single_loss) == 6
    torch.testing.assert_close(torch.tensor(mesh_loss), torch.tensor(single_loss), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(mesh_val), torch.tensor(single_val), atol=1e-4, rtol=0)
    assert all(r["bias"] == per_rank[0]["bias"] for r in per_rank), "every rank must hold the same balancing bias"
    single_bias = _single_biases(tmp_path / "single")
    assert len(single_bias) == len(per_rank[0]["bias"])
    for mesh_bias, bias in zip(per_rank[0]["bias"], single_bias):
        torch.testing.assert_close(torch.tensor(mesh_bias), bias)
    assert any(v != 0 for layer in per_rank[0]["bias"] for v in layer), "the bias must have moved"
    for r in per_rank:  # FSDP2 over all N ranks: 1/N of the replicated layout, up to the padding of odd rows
        assert r["local_numel"] <= 1.05 * r["numel"] / world, r

    if layout == "dp2":  # rank 0 exported the sharded checkpoint: transformers gives its logits
        import transformers

        ours = load_checkpoint(tmp_path / "mesh")[0]
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mesh" / "hf", dtype=torch.float32)
        ids = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(theirs.eval()(ids).logits, ours(ids)[0], atol=1e-5, rtol=1e-5)
    if layout != "dp2xep2":
        return
    model, _, cfg, tokenizer = load_checkpoint(tmp_path / "mesh")  # 4 ranks -> 1 process
    at1 = evaluate(model, load_corpus(None, tokenizer), cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    assert abs(at1["loss"] - mesh_val[-1]) < 1e-5
    at4 = launch(eval_worker, 4, tmp_path / "at4")  # dp 2 x ep 2 -> ep 4
    assert all(abs(r["loss"] - mesh_val[-1]) < 1e-5 for r in at4), (at4, mesh_val)
    assert all(r["windows"] * 4 == r["all_windows"] for r in at4), "each rank evaluates its quarter of the windows"
    assert all(r["load"] == at1["load"] and r["maxvio_global"] == at1["maxvio_global"] for r in at4), \
        "the load is summed over the ranks' shares"


def _moments(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's AdamW moments in a run's checkpoint, by name, read in this process whatever wrote it."""
    from dsmoe import checkpoint
    from dsmoe.model import MoETransformer
    from dsmoe.parallel import init_optimizer_state, training_tensors
    from dsmoe.train import build_optimizer

    ckpt = checkpoint.resolve(run_dir)
    model_cfg, train_cfg = checkpoint.configs_from_checkpoint(ckpt)
    model = MoETransformer(model_cfg)
    optimizer = build_optimizer(model, train_cfg)
    if checkpoint.is_sharded(ckpt):
        init_optimizer_state(optimizer)
        checkpoint.load_sharded(ckpt, training_tensors(model, optimizer))
    else:
        optimizer.load_state_dict(checkpoint.load_state(ckpt)["optimizer"])
    return {name: {k: optimizer.state[p][k] for k in ("exp_avg", "exp_avg_sq")} for name, p in model.named_parameters()}


def test_resume_at_another_layout(tmp_path, monkeypatch, capsys):
    """A run stopped at step 3 resumes at another layout, optimizer moments included: dp 2 x ep 2 (sharded
    checkpoint) -> ep 2 on 2 processes and -> 1 process (by the command line, which takes the launch's layout);
    1 process (whole tensors) -> ep 2. The losses of step 4
    and the final moments are the uninterrupted single-process run's. A bit flipped in a shard is refused."""
    from dsmoe.checkpoint import CheckpointError, _check_every_shard_is_here, load_checkpoint
    from dsmoe.data import Corpus
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    train(*build_configs("debug", TRAIN_SETS + [f"out={tmp_path / 'full'}"]), progress=False)
    full = torch.tensor(_train_rows(tmp_path / "full")[0])
    full_moments = _moments(tmp_path / "full")

    monkeypatch.setenv("DSMOE_RUN", str(tmp_path / "mesh"))  # dp 2 x ep 2 to step 3 ...
    monkeypatch.setenv("DSMOE_CUT", "1")
    monkeypatch.setenv("DSMOE_EP", "2")
    assert launch(resume_worker, 4, tmp_path / "results-mesh") == [{"interrupted": True}] * 4
    monkeypatch.delenv("DSMOE_CUT")
    for name in ("at2", "at1", "flipped"):
        shutil.copytree(tmp_path / "mesh", tmp_path / name)
    shard = sorted((tmp_path / "flipped" / "checkpoint" / "shards").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit in the middle of a rank's shard
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name} .*corrupt.*SHA-256"):
        load_checkpoint(tmp_path / "flipped")
    (tmp_path / "flipped" / "checkpoint" / "shards" / shard.name).unlink()  # as on a filesystem rank 0 alone sees
    with pytest.raises(OSError, match=f"the shards {shard.name} that other ranks wrote are not in"):
        _check_every_shard_is_here(tmp_path / "flipped" / "checkpoint" / "shards")
    monkeypatch.setenv("DSMOE_RUN", str(tmp_path / "at2"))  # ... then ep 2 on 2 processes
    assert launch(resume_worker, 2, tmp_path / "results-at2") == [{}, {}]
    # ... and 1 process, as a user resumes it: `dsmoe train --resume RUN`, no layout given, the launch's is taken
    assert cli.main(["train", "--resume", str(tmp_path / "at1"), "--quiet"]) == 0
    assert "expert_parallel=0 instead of the checkpoint's 2" in capsys.readouterr().out

    real = _cut_at_step_3()  # 1 process to step 3, then ep 2
    try:
        with pytest.raises(KeyboardInterrupt):
            train(*build_configs("debug", TRAIN_SETS + [f"out={tmp_path / 'one'}"]), progress=False)
    finally:
        Corpus.sample = real
    monkeypatch.setenv("DSMOE_RUN", str(tmp_path / "one"))
    monkeypatch.setenv("DSMOE_EP", "2")
    assert launch(resume_worker, 2, tmp_path / "results-one") == [{}, {}]

    for name in ("at2", "at1", "one"):
        torch.testing.assert_close(torch.tensor(_train_rows(tmp_path / name)[0]), full, atol=1e-4, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
        moments = _moments(tmp_path / name)
        assert moments.keys() == full_moments.keys()
        for param, state in full_moments.items():
            for key, value in state.items():
                torch.testing.assert_close(moments[param][key], value, atol=1e-6, rtol=1e-4,
                                           msg=lambda m, name=name, param=param: f"{name} {param}: {m}")


def _native_threads() -> list[str]:
    """This process's threads that are not Python's own (gloo's workers and loops, the TCPStore's)."""
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n or "tcpstore" in n)


def _as_torchrun_rank(rank, world, port, run_dir, out_dir, result_name):
    """A rank as torchrun starts it (the environment only, no process group yet): `train` sets the groups up
    itself, ends them, and this reports which native threads are left."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    before = _native_threads()
    train(*build_configs("debug", TRAIN_SETS + [f"out={run_dir}", "expert_parallel=2"]), progress=False)
    with open(os.path.join(out_dir, f"{result_name}{rank}.json"), "w") as f:
        json.dump({"before": before, "after": _native_threads(), "initialized": dist.is_initialized()}, f)


def test_a_run_ends_its_process_groups_and_their_threads(tmp_path, monkeypatch):
    """torchrun's ranks (init_context starts the groups): after a run every process group is destroyed and
    gloo's worker threads and the store's are joined before train() returns, so none is left to abort the
    process at exit."""
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_as_torchrun_rank, args=(r, 2, port, str(tmp_path / "run"), str(tmp_path), "rank"))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    for r in range(2):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert result == {"before": [], "after": [], "initialized": False}, result


def test_ranks_launched_with_different_settings_are_refused(tmp_path, monkeypatch):
    """Every rank refuses, in the first collective, naming each field that differs and the ranks' values."""
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DSMOE_RUN", str(tmp_path / "run"))
    results = launch(disagreeing_worker, 2, tmp_path / "results")
    for r in results:
        assert "launched with different settings" in r["error"], results
        assert "train.lr: rank 0 0.001, rank 1 0.002" in r["error"], results
        assert f"train.out: rank 0 '{tmp_path / 'run'}-0', rank 1 '{tmp_path / 'run'}-1'" in r["error"], results


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, monkeypatch):
    """A Ctrl-C that reaches one expert-parallel rank stops both after the same step (alone, that rank would
    enter the checkpoint's collectives while the other trained on); the checkpoint resumes in one process to
    the uninterrupted run's losses."""
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    train(*build_configs("debug", TRAIN_SETS + [f"out={tmp_path / 'full'}"]), progress=False)
    monkeypatch.setenv("DSMOE_RUN", str(tmp_path / "ep"))
    assert launch(ctrl_c_worker, 2, tmp_path / "results") == [{"interrupted": True, "handler_restored": True}] * 2
    assert json.load(open(tmp_path / "ep" / "checkpoint" / "config.json"))["step"] == 3
    train(*build_configs("debug", TRAIN_SETS + [f"out={tmp_path / 'ep'}", f"resume={tmp_path / 'ep'}"]),
          progress=False)
    torch.testing.assert_close(torch.tensor(_train_rows(tmp_path / "ep")[0]),
                               torch.tensor(_train_rows(tmp_path / "full")[0]), atol=1e-4, rtol=0)


def strike(rank: int, fault: dict) -> None:
    """The fault, now: rank 1 dies or hangs (DSMOE_FAULT), the others note when."""
    fault["at"] = time.monotonic()
    if rank == 1 and os.environ["DSMOE_FAULT"] == "die":
        os._exit(1)
    if rank == 1:
        time.sleep(6 * FAULT_TIMEOUT_S)


def train_through_fault(sets: list[str], fault: dict) -> dict:
    """Train (debug preset) until the fault stops the run: how it ended and how long after the fault."""
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    try:
        train(*build_configs("debug", sets), progress=False)
    except Exception as e:
        return {"error": str(e), "type": type(e).__name__, "seconds": time.monotonic() - fault["at"]}
    return {"error": None}


def mesh_fault_worker(rank, world):
    """dp 2 x ep 2 training, checkpoint every 2 steps; in step 3 rank 1 dies or hangs (DSMOE_FAULT). Returns how
    the others ended and how long after the fault."""
    from dsmoe.data import Corpus

    real, calls, fault = Corpus.sample, [], {}

    def batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            strike(rank, fault)
        return real(self, *args, **kwargs)

    Corpus.sample = batch
    return train_through_fault(TRAIN_SETS + [f"out={os.environ['DSMOE_RUN']}", "expert_parallel=2", "steps=6"],
                               fault)


@pytest.mark.parametrize("mode", ["hang", "die"])
def test_a_dead_or_hung_rank_stops_the_mesh_and_keeps_the_checkpoint(mode, tmp_path, monkeypatch):
    """A rank dies or hangs in step 3 of a dp 2 x ep 2 run: every other rank stops with a clear error within the
    process-group timeout (plus the collectives already in flight), naming the last good checkpoint (step 2),
    which is whole and resumes."""
    from dsmoe.checkpoint import load_checkpoint, read_config

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DSMOE_RUN", str(tmp_path / "run"))
    monkeypatch.setenv("DSMOE_FAULT", mode)
    per_rank = launch(mesh_fault_worker, 4, tmp_path / "results", timeout_s=FAULT_TIMEOUT_S)
    others = [r for i, r in enumerate(per_rank) if i != 1]
    assert all(r is not None and r["error"] for r in others), per_rank
    for r in others:
        assert "a collective failed" in r["error"] and "step 2" in r["error"], r
        assert r["seconds"] < 4 * FAULT_TIMEOUT_S + 10, r
    assert read_config(tmp_path / "run")["step"] == 2
    load_checkpoint(tmp_path / "run")

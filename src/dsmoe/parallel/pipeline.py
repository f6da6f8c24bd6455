"""Pipeline parallelism on torch.distributed.pipelining: the model split into stages by block, one or two stages
per pipeline rank (placed as the schedule wants: one each, a loop, or a V), scheduled by torch's own schedules
(no hand-written send/recv loop).

A rank holds the one model with the parts other ranks hold taken out: blocks outside its stages become
`Passthrough` (no parameters, so every name stays the whole model's: `layers.5.attn.wq.weight` on any rank, and DCP
checkpoints, key maps and FSDP2 see the same names as in one process), the embedding stays with the first stage,
the final norm, output head and multi-token-prediction modules with the last (the embedding too when the head is
tied to it or MTP uses it: its gradient is then summed over the two ranks). With two stages a rank, each is a
`StageView` of that model. The schedule passes each micro-batch's hidden states forward and their gradients back;
every stage also receives the micro-batch's token ids and targets as keyword arguments, so the last stage computes
the loss (and the MTP loss) itself and returns it.

Auxiliary losses are added on the stage that computes them: a stage's balance losses ride on its output with
`AuxGrad`, whose backward hands the (already weighted) loss a gradient of 1, so every stage's router learns from
its own aux loss although only the last stage's output is differentiated.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import get_schedule_class

from dsmoe import memory
from dsmoe.config import ModelConfig, TrainConfig
from dsmoe.memory import SPLIT_BACKWARD, check_layout_memory, split_blocks
from dsmoe.model import Block, MoETransformer, next_token_loss
from dsmoe.moe import MoE, moe_layers
from dsmoe.parallel.context import MeshContext
from dsmoe.parallel.fsdp import local, shard_model

_M = TypeVar("_M", bound=nn.Module)

SCHEDULES = memory.SCHEDULES  # --schedule -> torch's schedule class name (the planner's table)


def n_stages(pp: int, schedule: str) -> int:
    """The stages P pipeline ranks hold under a schedule."""
    return pp * memory.chunks_per_rank(schedule)


def block_costs(cfg: ModelConfig) -> list[int]:
    """Each block's parameters (its compute follows its active ones; a stage is balanced on both at once by
    the parameters, which dominate memory)."""
    moe = cfg.moe.num_params() if cfg.moe else 0
    return [cfg.block_params(moe if cfg.is_moe(i) else 3 * cfg.dim * cfg.dense_hidden) for i in range(cfg.n_layers)]


def split_layers(cfg: ModelConfig, stages: int) -> list[list[int]]:
    """The blocks of each stage, contiguous, minimizing the largest stage's parameters (the embedding counted on
    the first stage, the final norm, an untied head and the MTP modules on the last): dsmoe.memory's split, which
    the planner uses too."""
    n = cfg.n_layers
    if not 1 <= stages <= n:
        raise ValueError(f"{stages} pipeline stages need at least one block each: the model has n_layers={n} blocks "
                         "(--pipeline-parallel P makes P stages, 2P with --schedule interleaved)")
    costs = block_costs(cfg)
    head = cfg.dim + (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    if cfg.mtp_layers:
        head += cfg.num_params() - cfg.num_params(mtp=False)
    costs[0] += cfg.vocab_size * cfg.dim
    costs[-1] += head
    bounds = list(itertools.accumulate(split_blocks(tuple(costs), stages), initial=0))
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds)]


def describe_split(split: list[list[int]]) -> str:
    """'blocks 0-1 | 2-3' for the user."""
    return " | ".join(f"{s[0]}-{s[-1]}" if len(s) > 1 else str(s[0]) for s in split)


class Passthrough(nn.Module):
    """A block another stage holds: no parameters, its input unchanged."""

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        return x


class AuxGrad(torch.autograd.Function):
    """Identity on the hidden states whose backward also gives `aux` (a scalar loss computed from them or before
    them on this stage, already weighted by the stage: StageInfo.aux_weight) the gradient 1, as if it had been added
    to the final loss."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return h.clone()  # not a view of h: the zero-bubble schedules detach a stage's outputs in place

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


@dataclass
class StageInfo:
    """A stage's place, the weights on its micro-batches' losses, and what its forwards recorded since the step
    began: the last stage's next-token loss, this stage's aux loss, its MoE layers' load [L, E] and MaxVio [L]."""

    index: int
    layers: list[int]
    first: bool
    last: bool
    moe_ids: list[int] = field(default_factory=list)  # its MoE layers, as indices among all MoE layers
    weight: float | torch.Tensor = 1.0  # on a pipeline micro-batch's mean loss, per trained target it holds
    aux_weight: float = 1.0   # on its aux loss
    losses: list[torch.Tensor] = field(default_factory=list)
    aux: list[torch.Tensor] = field(default_factory=list)
    load: list[torch.Tensor] = field(default_factory=list)
    maxvio: list[torch.Tensor] = field(default_factory=list)

    def begin(self, weight: float | torch.Tensor, aux_weight: float) -> None:
        """weight: per trained target (a pipeline micro-batch's mean loss counts its targets times this)."""
        self.weight, self.aux_weight = weight, aux_weight
        for records in (self.losses, self.aux, self.load, self.maxvio):
            records.clear()


def stages_of(model: nn.Module) -> dict[int, StageInfo]:
    """The stages this rank's model holds, by index."""
    stages = getattr(model, "pp_stages", None)
    assert isinstance(stages, dict), "not a pipeline stage (make_stage)"
    return stages


def make_stage(model: MoETransformer, indices: list[int], split: list[list[int]]) -> MoETransformer:
    """The model (in place) reduced to the stages `indices` of `split` (one, or several a rank for the interleaved
    schedule), its forward the stages' (see the module docstring): forward(x, tokens_BS=, targets_BS=, docs_BS=,
    stage=) -> hidden states, or the loss on the last stage."""
    cfg = model.cfg
    moe_blocks = cfg.moe_blocks
    stages = {i: StageInfo(i, split[i], i == 0, i == len(split) - 1,
                           [moe_blocks.index(b) for b in split[i] if b in moe_blocks]) for i in indices}
    held = {b for info in stages.values() for b in info.layers}
    for i in range(cfg.n_layers):
        if i not in held:
            model.layers[i] = Passthrough()
    first, last = any(s.first for s in stages.values()), any(s.last for s in stages.values())
    if not last:
        model.norm, model.head, model.mtp = None, None, nn.ModuleList()  # type: ignore[assignment]
    if not first and not (last and (cfg.tie_embeddings or cfg.mtp_layers)):
        model.embed = None  # type: ignore[assignment]
    model.pp_stages = stages  # type: ignore[assignment]
    model.forward = types.MethodType(_stage_forward, model)  # type: ignore[method-assign]
    return model


class StageView(nn.Module):
    """One of several stages a rank holds, for torch's PipelineStage: its forward is the model's for that stage.
    The model is not a child (the rank's parameters are registered once, in it); `parameters()` gives this stage's
    own, which the zero-bubble schedules differentiate apart (their weight-gradient pass)."""

    model: MoETransformer

    def __init__(self, model: MoETransformer, index: int):
        super().__init__()
        object.__setattr__(self, "model", model)
        self.index = index

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        info, model = stages_of(self.model)[self.index], self.model
        parts: list[nn.Module | None] = [model.layers[i] for i in info.layers]
        if info.first:
            parts.append(model.embed)
        if info.last:
            parts += [model.norm, model.head, model.mtp]
        seen: set[int] = set()
        for part in parts:
            for p in part.parameters() if part is not None else ():
                if id(p) not in seen:  # a tied head is the embedding
                    seen.add(id(p))
                    yield p

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out: torch.Tensor = self.model(*args, stage=self.index, **kwargs)
        return out


def _stage_forward(self: MoETransformer, x: torch.Tensor, tokens_BS: torch.Tensor | None = None,
                   targets_BS: torch.Tensor | None = None, docs_BS: torch.Tensor | None = None,
                   stage: int | None = None) -> torch.Tensor:
    stages = stages_of(self)
    info = stages[stage] if stage is not None else next(iter(stages.values()))
    h_BSD = self.embed(x) if info.first else x
    rot_SR, mask_B1SS = self._rotary_and_mask(0, h_BSD.shape[1], docs_BS)
    for i in info.layers:
        h_BSD = self.layers[i](h_BSD, rot_SR, None, mask_B1SS)
    layers = [f for f in (self.layers[i].ffn for i in info.layers) if isinstance(f, MoE)]
    if layers:
        info.load.append(torch.stack([m.tokens_per_expert for m in layers]))
        info.maxvio.append(torch.stack([m.maxvio for m in layers]))
    aux = sum((m.aux_loss for m in layers), h_BSD.new_zeros((), dtype=torch.float32))
    if not info.last:
        info.aux.append(aux.detach())
        out: torch.Tensor = AuxGrad.apply(h_BSD, aux * info.aux_weight) if aux.requires_grad else h_BSD  # type: ignore[no-untyped-call]
        return out
    assert targets_BS is not None and tokens_BS is not None
    h_BSD = self.norm(h_BSD)
    loss = next_token_loss(self.head(h_BSD), targets_BS)
    info.losses.append(loss.detach())
    if self.mtp and self.training:
        aux = aux + self._mtp_loss(tokens_BS, targets_BS, h_BSD, docs_BS)
        aux = aux + sum((m.aux_loss for m in moe_layers(self.mtp)), aux.new_zeros(()))
    info.aux.append(aux.detach())
    return loss * (targets_BS != -1).sum() * info.weight + aux * info.aux_weight


# ---- the context ------------------------------------------------------------------------------------------


def check_layout(world: int, pp: int, ep: int, schedule: str, microbatches: int, global_batch: int) -> int:
    """pp x dp x ep against the processes launched, the schedule and the micro-batches, before any process group
    is set up (every rank refuses alike); returns dp."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule {schedule} is not available; choose one of {', '.join(SCHEDULES)}")
    if world % (pp * ep):
        raise ValueError(f"--pipeline-parallel {pp} x --expert-parallel {ep} must divide the {world} processes "
                         f"launched (pp x dp x ep = processes); with pp {pp}, ep may be one of "
                         f"{', '.join(str(d) for d in range(1, world // pp + 1) if (world // pp) % d == 0) or 'none'}")
    if schedule in SPLIT_BACKWARD and world > pp:
        raise ValueError(f"--schedule {schedule} runs on --pipeline-parallel alone (one process a stage), not on the "
                         f"{world // pp} data ranks (dp x ep) a stage would have here: torch 2.13's zero-bubble weight "
                         "pass does not find FSDP2's unsharded weights; use 1f1b or interleaved with data or expert "
                         "parallelism")
    M = microbatches or pp
    if schedule == "dualpipev" and M < 2 * pp:
        raise ValueError(f"--microbatches {M} is fewer than the {2 * pp} stages: DualPipeV needs at least one "
                         "micro-batch a stage")
    if schedule in ("1f1b", "interleaved", "zb") and M < pp:
        raise ValueError(f"--microbatches {M} is fewer than the {pp} pipeline ranks: {schedule} needs at least one "
                         "micro-batch a rank (use more, or --schedule gpipe)")
    if schedule == "interleaved" and M % (M // pp):
        raise ValueError(f"--microbatches {M} must be a multiple of its rounds ({M // pp} = M // pp): the interleaved "
                         f"schedule runs them round by round (e.g. {pp * (M // pp)})")
    rows = global_batch // (world // pp) if global_batch % (world // pp) == 0 else 0
    if not rows or rows % M:
        raise ValueError(f"batch_size={global_batch} must split over the {world // pp} data ranks (dp x ep) into "
                         f"{M} equal micro-batches each: a multiple of {world // pp * M}")
    return world // (pp * ep)


class PipelineContext(MeshContext):
    """pp x dp x ep processes: stage s on the ranks s*dp*ep .. (s+1)*dp*ep - 1, each stage laid out on its own
    (dp, ep) mesh exactly as MeshContext lays out a whole model; the ranks of a stage share the batch."""

    def __init__(self, pp: int, dp: int, ep: int, schedule: str = "1f1b", microbatches: int = 0,
                 device_type: str = "cpu", timeout_s: float = 300.0):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.pp, self.dp, self.ep = pp, dp, ep
        self.schedule_name, self.microbatches = schedule, microbatches or pp
        self.v = memory.chunks_per_rank(schedule)
        # the stages each pipeline rank holds, as torch's schedules place them (the planner's placement): one each;
        # a loop p, p + pp (interleaved); a V p, 2pp - 1 - p (zero bubble: first and last on rank 0)
        self.placement = memory.stage_chunks(schedule, pp, self.v)
        n = dp * ep
        mesh3 = init_device_mesh(device_type, (pp, dp, ep), mesh_dim_names=("pp", "dp", "ep"))
        self.mesh = mesh3["dp", "ep"]
        flat = init_device_mesh(device_type, (pp, n), mesh_dim_names=("pp", "dp_ep"))
        self.flat = flat["dp_ep"]
        self.pp_rank, self.stage_rank = divmod(self.rank, n)
        # the first and the last stage's ranks of one (dp, ep) place: where the shared embedding's grads meet
        # groups of our own take the run's timeout (new_group's default is 30 minutes): a peer that hangs in the
        # middle of a schedule fails a send or receive within dist_timeout_s
        self.timeout = timedelta(seconds=timeout_s)
        first, last = (next(r for r, own in enumerate(self.placement) if s in own) for s in (0, pp * self.v - 1))
        self.embed_ranks = (first, last)  # the pipeline ranks holding the first and the last stage
        pairs = [dist.new_group([first * n + j, last * n + j], timeout=self.timeout) for j in range(n)] \
            if first != last else []
        self.embed_group = pairs[self.stage_rank] if pairs and self.pp_rank in (first, last) else None
        self.device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else \
            torch.device("cpu")
        self.split: list[list[int]] = []
        self.schedule: Any = None

    @property
    def data_ranks(self) -> int:
        return self.dp * self.ep

    def shard(self, model: _M) -> _M:
        assert isinstance(model, MoETransformer)
        self.split = split_layers(model.cfg, n_stages(self.pp, self.schedule_name))
        make_stage(model, self.placement[self.pp_rank], self.split)
        if self.data_ranks > 1:
            shard_model(model, self.mesh, self.flat, [m for m in model.modules() if isinstance(m, Block)])
        return model

    def local_batch(self, *tensors_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B = len(tensors_B[0])
        if B % self.data_ranks:
            raise ValueError(f"batch_size={B} (the global batch) must be divisible by the {self.data_ranks} data ranks")
        return tuple(t.chunk(self.data_ranks)[self.stage_rank] for t in tensors_B)

    def _schedule(self, model: nn.Module, x: torch.Tensor) -> Any:
        """The stage and its schedule, built for this micro-batch shape at the first step."""
        if self.schedule is None:
            assert isinstance(model, MoETransformer)
            M = self.microbatches
            rows, S = x.shape[0] // M, x.shape[1]
            h = torch.empty(rows, S, _cfg(model).dim, device=self.device, requires_grad=True)
            stages = [PipelineStage(model if self.v == 1 else StageView(model, i), i, len(self.split), self.device,
                                    input_args=(x[:rows],) if info.first else (h,),
                                    output_args=torch.empty((), device=self.device) if info.last else h,
                                    group=self._pp_group())
                      for i, info in stages_of(model).items()]
            cls = get_schedule_class(SCHEDULES[self.schedule_name])
            self.schedule = cls(stages[0] if self.v == 1 else stages, n_microbatches=M, loss_fn=_the_loss,
                                scale_grads=False)
        return self.schedule

    def _pp_group(self) -> dist.ProcessGroup:
        """The pipeline's ranks of this (dp, ep) place."""
        if not hasattr(self, "_pp"):
            n = self.data_ranks
            groups = [dist.new_group([s * n + j for s in range(self.pp)], timeout=self.timeout) for j in range(n)]
            self._pp = groups[self.stage_rank]
        group: dist.ProcessGroup = self._pp
        return group

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, docs: torch.Tensor | None,
             weight: float, aux_weight: float, train: bool) -> None:
        schedule = self._schedule(model, x)
        M, targets = self.microbatches, (y != -1).sum().clamp(min=1)
        for info in stages_of(model).values():  # the micro-batch's loss = its targets' mean: per target weight / n
            info.begin(weight / targets, aux_weight / M)
        kwargs: dict[str, Any] = {"tokens_BS": x, "targets_BS": y, **({"docs_BS": docs} if docs is not None else {})}
        args = (x,) if self.pp_rank == 0 else ()
        if train:
            schedule.step(*args, target=y, return_outputs=False, **kwargs)
        elif self.schedule_name in SPLIT_BACKWARD:  # their eval() still runs backward actions (torch 2.13):
            with torch.enable_grad():  # a whole step of the losses weighted 0 instead, its zero gradients dropped
                for info in stages_of(model).values():
                    info.begin(0.0, 0.0)
                schedule.step(*args, target=y, return_outputs=False, **kwargs)
            for p in model.parameters():
                p.grad = None
        else:
            schedule.eval(*args, target=y, return_outputs=False, **kwargs)

    def _targets(self, y: torch.Tensor) -> list[torch.Tensor]:
        """The trained targets of each pipeline micro-batch of y."""
        return [(c != -1).sum() for c in y.chunk(self.microbatches)]

    def forward_backward(self, model: MoETransformer, x: torch.Tensor, y: torch.Tensor, docs: torch.Tensor | None,
                         weight: float, aux_weight: float,
                         amp: Callable[[], AbstractContextManager[Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        with amp():
            self._run(model, x, y, docs, weight, aux_weight, train=True)
        infos, zero, M = stages_of(model).values(), torch.zeros((), device=self.device), self.microbatches
        counts = self._targets(y)
        losses = [t for info in infos for t in info.losses]  # the last stage's, one per pipeline micro-batch
        loss = sum((t * c for t, c in zip(losses, counts)), zero) * weight / max(sum(counts), 1)
        return loss, sum((t for info in infos for t in info.aux), zero) / M

    def forward_loss(self, model: MoETransformer, x: torch.Tensor, y: torch.Tensor, docs: torch.Tensor | None,
                     amp: Callable[[], AbstractContextManager[Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        with amp():
            self._run(model, x, y, docs, 1.0, 1.0, train=False)
        counts = self._targets(y)
        last = [info for info in stages_of(model).values() if info.last]
        if not last:
            return torch.zeros((), device=self.device), torch.zeros((), dtype=torch.long)
        total = sum((loss.float() * c for loss, c in zip(last[0].losses, counts)), torch.zeros((), device=self.device))
        return total, sum(counts, torch.zeros((), dtype=torch.long))

    def routing_stats(self, model: MoETransformer) -> dict[str, torch.Tensor]:
        """Every MoE layer's load and MaxVio of the last step, this stage's rows filled (summed and averaged over
        its micro-batches), the others zero; Meter and evaluation all-reduce them over the ranks."""
        cfg = _cfg(model)
        if cfg.moe is None:
            return {}
        load = torch.zeros(cfg.n_moe_layers, cfg.moe.n_routed_experts, dtype=torch.long, device=self.device)
        maxvio = torch.zeros(cfg.n_moe_layers, device=self.device)
        for info in stages_of(model).values():
            if info.moe_ids and info.load:
                load[info.moe_ids] = torch.stack(info.load).sum(0)
                maxvio[info.moe_ids] = torch.stack(info.maxvio).mean(0)
        return {"tokens_per_expert": load, "maxvio": maxvio}

    def check_memory(self, model_cfg: ModelConfig, train_cfg: TrainConfig, available: int | None) -> None:
        """The planner's figure for this layout's busiest pipeline rank: its stages hold the model."""
        check_layout_memory(model_cfg, train_cfg, available, pp=self.pp, dp=self.dp, ep=self.ep)

    def layer_mean_(self, t_L: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_(t_L.clone()).div_(self.data_ranks)

    def all_reduce_layers_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.data_ranks > 1:
            dist.all_reduce(tensor, group=self.flat.get_group())
        return tensor

    @torch.no_grad()
    def reduce_grads(self, model: nn.Module) -> None:
        """The experts' as MeshContext's; the embedding held by the first and the last stage (tied to the head,
        or used by the MTP modules) gets the sum of both stages' gradients, on both."""
        super().reduce_grads(model)
        embed = getattr(model, "embed", None)
        if self.pp > 1 and self.embed_group is not None and isinstance(embed, nn.Embedding) and \
                _shared_embedding(model):
            grad = embed.weight.grad
            if grad is not None:
                dist.all_reduce(local(grad), group=self.embed_group)

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The whole model's norm: every stage's shards, the shared embedding counted once (on the first stage)."""
        embed = getattr(model, "embed", None)
        first, last = self.embed_ranks
        skip = embed.weight if isinstance(embed, nn.Embedding) and self.pp_rank == last != first and \
            _shared_embedding(model) else None
        grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
        counted = [local(p.grad) for p in model.parameters() if p.grad is not None and p is not skip]
        total = self.all_reduce_(torch.stack([g.float().square().sum() for g in counted]).sum()
                                 if counted else torch.zeros((), device=self.device)).sqrt()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
        return total


def _cfg(model: nn.Module) -> ModelConfig:
    assert isinstance(model, MoETransformer)
    return model.cfg


def _shared_embedding(model: nn.Module) -> bool:
    """Whether the embedding lives on the first and the last stage (tied head or MTP modules)."""
    cfg = _cfg(model)
    return cfg.tie_embeddings or cfg.mtp_layers > 0


def _the_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage returns its (weighted) loss itself."""
    return output

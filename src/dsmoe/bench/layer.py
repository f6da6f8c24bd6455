"""One MoE layer against the reference loop and a dense SwiGLU FFN of the same active FLOPs.

Candidates, all with the same input (T tokens of width D):

    dsmoe       MoE(cfg): router + grouped routed experts + fused shared experts (the fast path)
    reference   MoE(cfg, reference=True): the same layer with the per-expert loop (same weights)
    dense       SwiGLU(D, (K + N_s) * F): the FFN a token costs the same matmul FLOPs in

Times are medians over `repeats` after warmup. The candidates are interleaved inside each repeat (in a
rotating order) so that load from other processes hits all of them alike; the ratios to dense are taken
from that one run. "fwd" is a training forward (autograd on), "fwd+bwd" adds backward from a contiguous
upstream gradient. "memory" is the peak of bytes allocated by the forward above what was live before it:
what a training step keeps for backward plus the forward's temporaries (parameters, their gradients and
the input excluded). On CUDA it is torch.cuda.max_memory_allocated; on CPU the same quantity counted
exactly by a TorchDispatchMode that follows every storage the forward's ops create until it is freed.

On CPU a second table, "matmuls alone", times only the matmuls of the dsmoe and dense rows (into
preallocated buffers, nothing else): the ratio any one-matmul-per-expert implementation starts from on this
machine. (On CUDA the layer runs one grouped matmul per projection instead, so no such floor is printed.)
"""

from __future__ import annotations

import itertools
import math
import platform
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dsmoe import runtime
from dsmoe.config import MoEConfig
from dsmoe.experts import SwiGLU
from dsmoe.moe import MoE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Row:
    name: str
    fwd_ms: float
    fwd_bwd_ms: float
    memory_mb: float
    fwd_vs_dense: float = float("nan")
    fwd_bwd_vs_dense: float = float("nan")
    memory_vs_dense: float = float("nan")


# ----------------------------------------------------------------------------- memory

class _StorageTracker(TorchDispatchMode):
    """Counts the bytes of every storage created by an op under this mode while it is alive."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            if s.data_ptr() in inputs or s.nbytes() == 0:
                continue  # a view or an in-place result: no new memory
            inputs.add(s.data_ptr())
            self.live += s.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(s, self._free, s.nbytes())
        return out


def forward_memory(module, x) -> int:
    """Peak bytes allocated by a training forward above what was live before it."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        y = module(x)
        torch.cuda.synchronize(x.device)
        peak = torch.cuda.max_memory_allocated(x.device) - base
    else:
        with _StorageTracker() as tracker:
            y = module(x)
        peak = tracker.peak
    del y
    return peak


# ----------------------------------------------------------------------------- timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_fwd(module, x):
    t = time.perf_counter()
    module(x)
    _sync(x.device)
    return time.perf_counter() - t


def _time_fwd_bwd(module, x, grad_y):
    for p in module.parameters():
        p.grad = None
    x.grad = None
    t = time.perf_counter()
    module(x).backward(grad_y)
    _sync(x.device)
    return time.perf_counter() - t


def build(cfg: MoEConfig, device, dtype, seed: int = 0, reference: bool = True) -> dict[str, torch.nn.Module]:
    """The candidates (the reference layer only when `reference`), sharing the fast layer's weights, with the MoE
    layers as training builds them: without the per-forward NaN check, whose host sync would stall a GPU.

    Built on the device itself: a DeepSeek-V3-sized layer is 45 GB of fp32 weights before the cast, too many to
    build in host memory first."""
    cfg = cfg.replace(check_inputs=False)
    torch.manual_seed(seed)
    with torch.device(device):
        models: dict[str, torch.nn.Module] = {"dsmoe": MoE(cfg).to(dtype)}
        if reference:
            models["reference"] = MoE(cfg, reference=True).to(dtype)
            models["reference"].load_state_dict(models["dsmoe"].state_dict())
        models["dense"] = SwiGLU(cfg.dim, (cfg.top_k + cfg.n_shared_experts) * cfg.expert_dim).to(dtype)
    return models


def bench_layer(cfg: MoEConfig, tokens: int, device="cpu", dtype=torch.float32, repeats: int = 5,
                warmup: int = 1, reference: bool = True) -> list[Row]:
    """Rows for dsmoe, reference and dense: median times (ms), forward memory (MB), ratios to dense."""
    device = torch.device(device)
    models = build(cfg, device, dtype, reference=reference)
    x = torch.randn(tokens, cfg.dim, device=device, dtype=dtype, requires_grad=True)
    return compare(models, x, repeats, warmup)


def compare(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int = 5, warmup: int = 1) -> list[Row]:
    """Each module's median forward and forward+backward times and forward memory on input x, interleaved
    (the order rotates every repeat), with ratios to the last module (the baseline)."""
    grad_y = torch.ones_like(x)  # contiguous, unlike sum().backward()
    names = list(models)
    fwd: dict[str, list[float]] = {n: [] for n in names}
    fwd_bwd: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every repeat
            tf, tb = _time_fwd(models[n], x), _time_fwd_bwd(models[n], x, grad_y)
            if r >= warmup:
                fwd[n].append(tf)
                fwd_bwd[n].append(tb)
    rows = [Row(n, 1e3 * statistics.median(fwd[n]), 1e3 * statistics.median(fwd_bwd[n]),
                forward_memory(models[n], x) / 2**20) for n in names]
    base = rows[-1]
    for row in rows:
        row.fwd_vs_dense = row.fwd_ms / base.fwd_ms
        row.fwd_bwd_vs_dense = row.fwd_bwd_ms / base.fwd_bwd_ms
        row.memory_vs_dense = row.memory_mb / base.memory_mb
    return rows


# ----------------------------------------------------------------------------- sweep

SWEEP = {"tokens": (128, 512, 2048, 8192, 16384), "experts": (8, 16, 32, 64, 128, 256), "top_k": (1, 2, 4, 8, 16)}


def sweep(base: MoEConfig, tokens: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
          repeats: int = 3, warmup: int = 1, axes: dict[str, tuple[int, ...]] | None = None) -> list[dict[str, Any]]:
    """The layer against the dense FFN of its active width, along three axes from `base` at `tokens` tokens:
    the tokens in a batch; the routed experts at constant active width (K and F fixed, so only the total
    grows); top-k at constant expert width (the active width, and the dense FFN, grow with K). One row per
    point with the forward and forward+backward ratios to dense: where the MoE pays off on this machine."""
    rows = []
    for axis, values in (axes or SWEEP).items():
        for value in values:
            cfg, T = base, tokens
            if axis == "tokens":
                T = value
            elif axis == "experts":
                cfg = base.replace(n_routed_experts=value, top_k=min(base.top_k, value), n_groups=1, topk_groups=1)
            else:
                cfg = base.replace(top_k=min(value, base.n_routed_experts))
            moe = bench_layer(cfg, T, device, dtype, repeats, warmup, reference=False)[0]
            rows.append({"axis": axis, "value": value, "tokens": T, "experts": cfg.n_routed_experts,
                         "top_k": cfg.top_k, "fwd_vs_dense": moe.fwd_vs_dense,
                         "fwd_bwd_vs_dense": moe.fwd_bwd_vs_dense})
    return rows


# ----------------------------------------------------------------------------- matmul floor

def _swiglu_matmuls(rows: list[int], dim: int, hidden: int, device, dtype):
    """(forward, backward): the 3 and 6 matmuls of SwiGLU blocks over consecutive row blocks (one weight set
    per block), every one into a preallocated buffer, with nothing else around them."""
    n, B = sum(rows), len(rows)
    new = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    x, gy, y, gx = new(n, dim), new(n, dim), new(n, dim), new(n, dim)
    g, u, h, gh = new(n, hidden), new(n, hidden), new(n, hidden), new(n, hidden)
    w1, w3, w2 = new(B, hidden, dim), new(B, hidden, dim), new(B, dim, hidden)
    gw1, gw3, gw2 = torch.empty_like(w1), torch.empty_like(w3), torch.empty_like(w2)
    blocks = [(slice(a - r, a), b) for b, (a, r) in enumerate(zip(itertools.accumulate(rows), rows)) if r]

    def forward():
        for s, b in blocks:
            torch.mm(x[s], w1[b].T, out=g[s])
            torch.mm(x[s], w3[b].T, out=u[s])
            torch.mm(h[s], w2[b].T, out=y[s])

    def backward():
        for s, b in blocks:
            torch.mm(gy[s].T, h[s], out=gw2[b])
            torch.mm(gy[s], w2[b], out=gh[s])
            torch.mm(g[s].T, x[s], out=gw1[b])
            torch.mm(u[s].T, x[s], out=gw3[b])
            torch.mm(g[s], w1[b], out=gx[s])
            gx[s].addmm_(u[s], w3[b])

    return forward, backward


def matmul_floor(layer: MoE, x: torch.Tensor, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """The matmuls alone: the routed experts' (one per expert, for the routing `layer` gives x) and the shared
    experts' forward and backward matmuls against the dense FFN's of the same FLOPs (router excluded), all
    into preallocated buffers with no gather, scatter, elementwise op, allocation or autograd around them.
    Their ratio is what one-matmul-per-expert costs on this machine before any routing work: the floor
    under the layer's ratio."""
    cfg, (T, D), device, dtype = layer.cfg, x.shape, x.device, x.dtype
    with torch.no_grad():
        layer(x)
    candidates = {
        "dsmoe": [_swiglu_matmuls(layer.tokens_per_expert.tolist(), D, cfg.expert_dim, device, dtype)]
        + ([_swiglu_matmuls([T], D, cfg.n_shared_experts * cfg.expert_dim, device, dtype)]
           if cfg.n_shared_experts else []),
        "dense": [_swiglu_matmuls([T], D, (cfg.top_k + cfg.n_shared_experts) * cfg.expert_dim, device, dtype)],
    }
    times: dict[tuple[str, str], list[float]] = {(n, p): [] for n in candidates for p in ("fwd", "bwd")}
    for r in range(warmup + repeats):
        for name, parts in candidates.items():
            for phase, i in (("fwd", 0), ("bwd", 1)):
                _sync(device)
                t = time.perf_counter()
                for part in parts:
                    part[i]()
                _sync(device)
                if r >= warmup:
                    times[name, phase].append(time.perf_counter() - t)
    ms = {f"{n}_{p}": 1e3 * statistics.median(v) for (n, p), v in times.items()}
    out = {}
    for n in candidates:
        out[f"{n}_fwd_ms"], out[f"{n}_fwd_bwd_ms"] = ms[f"{n}_fwd"], ms[f"{n}_fwd"] + ms[f"{n}_bwd"]
    out["fwd_vs_dense"] = out["dsmoe_fwd_ms"] / out["dense_fwd_ms"]
    out["fwd_bwd_vs_dense"] = out["dsmoe_fwd_bwd_ms"] / out["dense_fwd_bwd_ms"]
    return out


# ----------------------------------------------------------------------------- report

def machine(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        where = _cpu_model() + f", {threads} thread{'s' if threads > 1 else ''}"
    allocator = "; glibc malloc keeps freed memory" if runtime.freed_memory_kept and device.type == "cpu" else ""
    return f"{where}; torch {torch.__version__}; python {platform.python_version()}{allocator}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_sweep(rows: list[dict]) -> str:
    """The sweep's ratios to the dense FFN, one row per axis value."""
    lines = [f"{'axis':<8} {'value':>6} {'fwd':>7} {'fwd+bwd':>8}"]
    lines += [f"{r['axis']:<8} {r['value']:>6} {r['fwd_vs_dense']:>7.3f} {r['fwd_bwd_vs_dense']:>8.3f}" for r in rows]
    return "\n".join(lines)


def format_table(rows: list[Row]) -> str:
    lines = [f"{'layer':<10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'memory MB':>10} "
             f"{'fwd/dense':>10} {'f+b/dense':>10} {'mem/dense':>10}"]
    for r in rows:
        mem = (f"{r.memory_mb:>10.1f}", f"{r.memory_vs_dense:>10.3f}") if math.isfinite(r.memory_mb) else ("-",) * 2
        lines.append(f"{r.name:<10} {r.fwd_ms:>9.2f} {r.fwd_bwd_ms:>11.2f} {mem[0]:>10} "
                     f"{r.fwd_vs_dense:>10.3f} {r.fwd_bwd_vs_dense:>10.3f} {mem[1]:>10}")
    return "\n".join(lines)

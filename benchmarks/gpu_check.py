"""Everything GPU-specific in one go, one table at the end (a few minutes on an H100/H200-class GPU):

    1. the CUDA tests (grouped_mm experts against the reference loop, bf16)
    2. `bench layer` in bf16 at the default shape and at a DeepSeek-V3-like shape (D 7168, 256 experts of
       width 2048, top-8, 1 shared): time and achieved TFLOP/s against a dense FFN of the same active width
    3. `bench train` in bf16 (tiny vs tiny-dense tokens/s)
    4. torch.compile of the tiny model: warm-up, then compiled vs eager step time

    python benchmarks/gpu_check.py            # on a GPU machine
    python benchmarks/gpu_check.py --smoke    # every step at micro shapes on whatever device there is

Without a GPU (and without --smoke) it says so and exits 0.
"""

import argparse
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from dsmoe.bench import layer, train
from dsmoe.config import MoEConfig
from dsmoe.model import MoETransformer
from dsmoe.presets import build_configs
from dsmoe.train import as_trained

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name -> (MoEConfig fields, tokens)
    "default": (dict(dim=512, n_routed_experts=64, expert_dim=256, top_k=6, n_shared_experts=2), 16384),
    "v3-like": (dict(dim=7168, n_routed_experts=256, expert_dim=2048, top_k=8, n_shared_experts=1), 8192),
}
SMOKE = {"default": (dict(dim=16, n_routed_experts=4, expert_dim=8, top_k=2, n_shared_experts=1), 64)}


def cuda_tests(smoke: bool) -> str:
    where, select = (["tests/test_experts.py"], "bf16") if smoke else (["tests"], "cuda")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", *where, "-k", select], capture_output=True, text=True,
                         cwd=ROOT)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr.strip()[-200:]
    return last if out.returncode == 0 else f"FAILED: {last}"


def layer_flops(cfg: MoEConfig, tokens: int) -> float:
    """Forward FLOPs of the layer: router, and 3 matmuls per active expert (routed + shared)."""
    D, F_ = cfg.dim, cfg.expert_dim
    return 2 * tokens * D * cfg.n_routed_experts + 3 * 2 * tokens * (cfg.top_k + cfg.n_shared_experts) * D * F_


def layer_row(name: str, fields: dict, tokens: int, device: torch.device, dtype: torch.dtype) -> str:
    cfg = MoEConfig(**fields)
    moe, dense = layer.bench_layer(cfg, tokens, device, dtype, repeats=5, warmup=2, reference=False)
    flops = layer_flops(cfg, tokens)
    dense_flops = 3 * 2 * tokens * (cfg.top_k + cfg.n_shared_experts) * cfg.dim * cfg.expert_dim
    tflops = 3 * flops / (moe.fwd_bwd_ms / 1e3) / 1e12
    dense_tflops = 3 * dense_flops / (dense.fwd_bwd_ms / 1e3) / 1e12
    return (f"{name}: fwd {moe.fwd_vs_dense:.2f}x, fwd+bwd {moe.fwd_bwd_vs_dense:.2f}x dense time; "
            f"fwd+bwd {tflops:.1f} TFLOP/s vs dense {dense_tflops:.1f} ({tflops / dense_tflops:.0%} of dense)")


def train_row(device: torch.device, smoke: bool) -> str:
    steps, chunk = (2, 1) if smoke else (40, 4)
    size = dict(batch_size=2, seq_len=16) if smoke else {}
    moe, dense = train.bench_train("debug" if smoke else "tiny", steps, chunk, 1, device=device, **size)
    ratio = moe.tokens_per_s / dense.tokens_per_s
    return f"MoE {moe.tokens_per_s:,.0f} tok/s, dense twin {dense.tokens_per_s:,.0f}: {ratio:.2f}x"


def compile_row(device: torch.device, smoke: bool) -> str:
    model_cfg = as_trained(build_configs("debug" if smoke else "tiny")[0])
    torch.manual_seed(0)
    eager = MoETransformer(model_cfg).to(device)
    compiled = MoETransformer(model_cfg).to(device)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    x = torch.randint(0, model_cfg.vocab_size, (4 if smoke else 16, 33 if smoke else 129), device=device)

    def step(model: MoETransformer) -> float:
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = model(x[:, :-1], x[:, 1:])
        (loss + model.aux_loss()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    warm = step(compiled)
    times = {"eager": [], "compiled": []}
    for _ in range(2 if smoke else 10):
        times["eager"].append(step(eager))
        times["compiled"].append(step(compiled))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return (f"warm-up {warm:.1f} s; eager {1e3 * med['eager']:.1f} ms/step, compiled {1e3 * med['compiled']:.1f} "
            f"({med['eager'] / med['compiled']:.2f}x)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="micro shapes on whatever device there is (a check of "
                                                        "this script, not a measurement)")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("no GPU: torch sees no CUDA device, so there is nothing to check here; the README's GPU numbers "
              "stay pending until this runs on a GPU")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = [("CUDA tests", lambda: cuda_tests(args.smoke))]
    for name, (fields, tokens) in (SMOKE if args.smoke else SHAPES).items():
        steps.append((f"bench layer {name}", lambda n=name, f=fields, t=tokens: layer_row(n, f, t, device, dtype)))
    steps += [("bench train", lambda: train_row(device, args.smoke)),
              ("compile", lambda: compile_row(device, args.smoke))]
    results = []
    for name, run in steps:
        t = time.perf_counter()
        try:
            results.append((name, run(), time.perf_counter() - t))
        except Exception as e:  # one failing step must not hide the others' numbers
            traceback.print_exc()
            message = re.sub(r"\s+", " ", str(e))[:200]
            results.append((name, f"FAILED: {type(e).__name__}: {message}", time.perf_counter() - t))
    print(f"\n{layer.machine(device)}; {str(dtype).removeprefix('torch.')}")
    for name, result, seconds in results:
        print(f"{name:<22} {seconds:>6.0f} s  {result}")
    return 1 if any(r.startswith("FAILED") for _, r, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())

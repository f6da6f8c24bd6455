"""Peak memory and time of dsmoe.from_pretrained: loading a checkpoint of N bytes should raise the process's
peak resident memory by about N (the weights, allocated once) plus a few tensors in flight, not 2N.

    python benchmarks/bench_load.py [--family deepseek_v3|qwen3_moe|...|all] [--hidden 1024] [--layers 6]
                                    [--experts 32] [--dtype fp32|bf16] [--keep-freed-memory]

Builds a model of the family with transformers (random weights, nothing downloaded; every family the same
width, depth and experts), saves it in shards, then loads it with dsmoe in a fresh process that reports its
resident memory after the imports, its peak (VmHWM) after loading and the seconds from_pretrained took; the ratio
(peak - before) / N is printed with the machine. A second fresh process times transformers'
AutoModelForCausalLM.from_pretrained of the same folder, after dsmoe's (so both read it from the page cache).
With --keep-freed-memory the loading process first sets the allocator as the `dsmoe` command does.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, torch
import dsmoe
from dsmoe.runtime import keep_freed_memory

if sys.argv[2] == "keep":
    keep_freed_memory()

def status(field):  # /proc/self/status, in bytes: VmRSS now, VmHWM the peak of this process image
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

before = status("VmRSS")
import time
start = time.perf_counter()
model = dsmoe.from_pretrained(sys.argv[1])
seconds = time.perf_counter() - start
after = status("VmHWM")
nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
from dsmoe.bench.layer import machine  # after the measurement: it names this process's allocator setting
print(json.dumps({"before": before, "after": after, "model_bytes": nbytes, "machine": machine("cpu"),
                  "seconds": seconds}))
"""

THEIRS = """
import sys, time, torch, transformers
start = time.perf_counter()
transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2])
print(time.perf_counter() - start)
"""
FAMILIES = ("deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "glm4_moe", "dots1")


def family_config(family: str, hidden: int, layers: int, experts: int):
    """A transformers config of the family at this width, depth and expert count (4 experts per token)."""
    import transformers

    common = dict(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=16, num_key_value_heads=4, num_experts_per_tok=4, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    width = hidden // 2
    fields = {
        "deepseek_v3": dict(moe_intermediate_size=width, num_key_value_heads=16, kv_lora_rank=256, q_lora_rank=384,
                            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=experts,
                            n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1),
        "qwen2_moe": dict(moe_intermediate_size=width, num_experts=experts, shared_expert_intermediate_size=width),
        "qwen3_moe": dict(moe_intermediate_size=width, num_experts=experts, head_dim=64),
        "mixtral": dict(intermediate_size=width, num_local_experts=experts),
        "olmoe": dict(intermediate_size=width, num_experts=experts),
        "glm4_moe": dict(moe_intermediate_size=width, n_routed_experts=experts, n_shared_experts=1,
                         first_k_dense_replace=1, head_dim=64),
        "dots1": dict(moe_intermediate_size=width, n_routed_experts=experts, n_shared_experts=1,
                      first_k_dense_replace=1, head_dim=64),
    }[family]
    return transformers.AutoConfig.for_model(family, **(common | fields))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=[*FAMILIES, "all"], default="deepseek_v3")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--keep-freed-memory", action="store_true", help="the dsmoe command's allocator setting")
    args = p.parse_args()
    for family in FAMILIES if args.family == "all" else (args.family,):
        bench(family, args)
    return 0


def bench(family: str, args: argparse.Namespace) -> None:
    import torch
    import transformers

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = family_config(family, args.hidden, args.layers, args.experts)
    with tempfile.TemporaryDirectory() as tmp:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(tmp, max_shard_size="100MB")
        del model
        files = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        allocator = "keep" if args.keep_freed_memory else "default"
        out = subprocess.run([sys.executable, "-c", CHILD, tmp, allocator], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        theirs = subprocess.run([sys.executable, "-c", THEIRS, tmp, str(dtype).removeprefix("torch.")],
                                capture_output=True, text=True, check=True)
        their_seconds = float(theirs.stdout.strip().splitlines()[-1])
    raised = r["after"] - r["before"]
    print(f"{family}: machine: {r['machine']}; {args.dtype}")
    print(f"  checkpoint files {files / 2**20:.0f} MiB, model tensors {r['model_bytes'] / 2**20:.0f} MiB")
    print(f"  RSS {r['before'] / 2**20:.0f} MiB after the imports, peak {r['after'] / 2**20:.0f} MiB after loading")
    print(f"  peak RSS raised by loading: {raised / 2**20:.0f} MiB = {raised / r['model_bytes']:.2f}x the model's "
          f"bytes")
    print(f"  load time: dsmoe {r['seconds']:.2f} s, transformers {their_seconds:.2f} s (dsmoe takes "
          f"{r['seconds'] / their_seconds:.2f}x transformers' time)")


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of dsmoe.from_pretrained: loading a checkpoint of N bytes should raise the process's peak
resident memory by about N (the weights, allocated once) plus a few tensors in flight, not 2N.

    python benchmarks/bench_load.py [--hidden 1024] [--layers 6] [--experts 32] [--dtype fp32|bf16]
                                    [--keep-freed-memory]

Builds a DeepSeek-V3-shaped model with transformers (random weights, nothing downloaded), saves it in
shards, then loads it with dsmoe in a fresh process that reports its resident memory after the imports
and its peak (VmHWM) after loading; the ratio (peak - before) / N is printed with the machine. With
--keep-freed-memory the loading process first sets the allocator as the `dsmoe` command does.
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
model = dsmoe.from_pretrained(sys.argv[1])
after = status("VmHWM")
nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
from dsmoe.bench.layer import machine  # after the measurement: it names this process's allocator setting
print(json.dumps({"before": before, "after": after, "model_bytes": nbytes, "machine": machine("cpu")}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--keep-freed-memory", action="store_true", help="the dsmoe command's allocator setting")
    args = p.parse_args()

    import torch
    import transformers

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = transformers.DeepseekV3Config(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.hidden // 2,
        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=256,
        q_lora_rank=384, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=args.experts,
        num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1)
    with tempfile.TemporaryDirectory() as tmp:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(tmp, max_shard_size="100MB")
        del model
        files = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        allocator = "keep" if args.keep_freed_memory else "default"
        out = subprocess.run([sys.executable, "-c", CHILD, tmp, allocator], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    raised = r["after"] - r["before"]
    print(f"machine: {r['machine']}; {args.dtype}")
    print(f"checkpoint files {files / 2**20:.0f} MiB, model tensors {r['model_bytes'] / 2**20:.0f} MiB")
    print(f"RSS {r['before'] / 2**20:.0f} MiB after the imports, peak {r['after'] / 2**20:.0f} MiB after loading")
    print(f"peak RSS raised by loading: {raised / 2**20:.0f} MiB = {raised / r['model_bytes']:.2f}x the model's bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

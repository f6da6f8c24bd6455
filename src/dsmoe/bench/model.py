"""A whole DeepSeek-V3 model in dsmoe against transformers' DeepseekV3ForCausalLM, same config and weights.

transformers builds the model (random weights, a nonzero balancing bias), saves it, and dsmoe loads that
folder with dsmoe.from_pretrained, so both run the same network; their logits are compared before timing.
transformers runs its routed experts through its `grouped_mm` experts implementation where its config
accepts it (`experts_implementation`, transformers 5), else the one it picked, which is reported.

Candidates, fp32, interleaved (the order flips every repeat) so that load from other processes hits both
alike; medians over repeats:

    fwd         an inference forward (eval mode, no_grad) of a batch of B x S random tokens -> logits
    fwd+bwd     a training forward (train mode) + next-token cross-entropy + backward: a training step
                without the optimizer (the same for both: AdamW over the same parameters)
    memory      peak bytes a training forward allocates above what was live before it (what backward keeps
                plus temporaries; CPU: counted exactly by dsmoe.bench.layer's storage tracker)
    generate    greedy decoding of N new tokens after a prompt (batch 1): dsmoe with its latent KV cache,
                dsmoe recomputing the whole sequence every token (no cache), transformers' generate with its
                cache; tokens/s = N / median seconds (repeats // 2 interleaved runs after one untimed)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dsmoe.bench.layer import forward_memory
from dsmoe.model import MoETransformer
from dsmoe.pretrained import from_pretrained


@dataclass
class Shape:
    """The benchmarked model (DeepSeek-V3 layout: MLA with q_lora, sigmoid routing, dense first block) and batch."""

    vocab_size: int = 260        # dsmoe's byte tokenizer
    hidden: int = 256            # D
    layers: int = 4
    heads: int = 16
    kv_lora_rank: int = 64       # MLA's compressed KV (the latent cache holds this + qk_rope per token)
    q_lora_rank: int = 96
    qk_nope: int = 32
    qk_rope: int = 16
    v_head: int = 32
    experts: int = 32            # routed experts E
    top_k: int = 4               # K
    shared: int = 1
    expert_dim: int = 128        # F, moe_intermediate_size
    first_k_dense: int = 1
    n_group: int = 4             # V3's group-limited routing: topk_group of n_group groups
    topk_group: int = 2
    batch: int = 8               # B
    seq: int = 128               # S
    max_seq_len: int = 512

    def hf_config(self, transformers):
        return transformers.DeepseekV3Config(
            vocab_size=self.vocab_size, hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.heads, kv_lora_rank=self.kv_lora_rank,
            q_lora_rank=self.q_lora_rank, qk_nope_head_dim=self.qk_nope, qk_rope_head_dim=self.qk_rope,
            v_head_dim=self.v_head, n_routed_experts=self.experts, num_experts_per_tok=self.top_k,
            n_shared_experts=self.shared, moe_intermediate_size=self.expert_dim,
            intermediate_size=(self.top_k + self.shared) * self.expert_dim,  # the dense block: the active width
            first_k_dense_replace=self.first_k_dense, n_group=self.n_group, topk_group=self.topk_group,
            max_position_embeddings=self.max_seq_len, tie_word_embeddings=False)

    def describe(self) -> str:
        return (f"D={self.hidden} L={self.layers} ({self.first_k_dense} dense) H={self.heads} MLA kv_lora "
                f"{self.kv_lora_rank} q_lora {self.q_lora_rank} qk {self.qk_nope}+{self.qk_rope} v {self.v_head}; "
                f"E={self.experts} K={self.top_k} F={self.expert_dim} {self.shared} shared, groups "
                f"{self.topk_group}/{self.n_group}; V={self.vocab_size}; batch {self.batch} x {self.seq}")


@dataclass
class Row:
    name: str
    fwd_ms: float
    fwd_bwd_ms: float
    memory_mb: float
    fwd_vs_dsmoe: float = float("nan")      # this row's time / dsmoe's: > 1 = dsmoe is faster
    fwd_bwd_vs_dsmoe: float = float("nan")
    memory_vs_dsmoe: float = float("nan")


@dataclass
class GenRow:
    name: str
    tokens_per_s: float
    seconds: float       # median over repeats


@dataclass
class Result:
    shape: str
    experts_implementation: str   # what transformers' experts ran
    max_logit_diff: float         # |dsmoe - transformers| of the benchmarked batch's logits
    rows: list[Row]
    generation: list[GenRow] = field(default_factory=list)
    same_tokens: bool = True      # the three greedy generations agree


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise RuntimeError("`dsmoe bench model` needs transformers >= 5 (pip install 'transformers>=5')") from None
    if not hasattr(transformers, "DeepseekV3ForCausalLM"):
        raise RuntimeError(f"transformers {transformers.__version__} has no DeepseekV3ForCausalLM; install >= 5")
    return transformers


def build(shape: Shape, seed: int = 0):
    """(dsmoe model, transformers model, experts implementation): one set of weights, fp32 on CPU."""
    transformers = transformers_module()
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(shape.hf_config(transformers), dtype=torch.float32)
    with torch.no_grad():
        for name, t in [*hf.named_parameters(), *hf.named_buffers()]:
            if name.endswith("e_score_correction_bias"):  # a trained V3 has one: routing then depends on it
                t.copy_(torch.randn(t.shape) * 0.05)
    if hasattr(hf, "set_experts_implementation"):
        try:
            hf.set_experts_implementation("grouped_mm")
        except (ValueError, ImportError, KeyError):
            pass  # the implementation below says what runs instead
    impl = str(getattr(hf.config, "_experts_implementation", None) or "eager (no experts_implementation)")
    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" is not the benchmark's output
    try:
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            ours = from_pretrained(tmp)
    finally:
        if bar:
            transformers.utils.logging.enable_progress_bar()
    return ours, hf, impl


def _candidates(ours: MoETransformer, hf) -> dict[str, tuple[Callable, Callable]]:
    """name -> (logits of x, training loss of x, y)."""

    def ours_loss(x, y):
        return ours(x, y)[1]

    def hf_logits(x):
        return hf(input_ids=x, use_cache=False).logits

    def hf_loss(x, y):
        return F.cross_entropy(hf_logits(x).float().flatten(0, 1), y.flatten())

    return {"dsmoe": (lambda x: ours(x)[0], ours_loss), "transformers": (hf_logits, hf_loss)}


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def bench_model(shape: Shape | None = None, repeats: int = 5, warmup: int = 1, new_tokens: int = 32,
                prompt: int = 16, memory: bool = True, seed: int = 0) -> Result:
    """Median forward and forward+backward times of dsmoe and transformers on one batch (ratios to dsmoe), their
    training-forward memory, and greedy generation tokens/s (new_tokens 0 skips generation)."""
    shape = shape or Shape()
    ours, hf, impl = build(shape, seed)
    models = {"dsmoe": ours, "transformers": hf}
    candidates = _candidates(ours, hf)
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq + 1), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    with torch.no_grad():
        diff = (candidates["dsmoe"][0](x) - candidates["transformers"][0](x)).abs().max().item()

    def fwd(name):
        models[name].eval()
        with torch.no_grad():
            candidates[name][0](x)

    def fwd_bwd(name):
        models[name].train()
        models[name].zero_grad(set_to_none=True)
        candidates[name][1](x, y).backward()

    times: dict[tuple[str, str], list[float]] = {(n, p): [] for n in models for p in ("fwd", "fwd_bwd")}
    for r in range(warmup + repeats):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            tf, tb = _timed(fwd, name), _timed(fwd_bwd, name)
            if r >= warmup:
                times[name, "fwd"].append(tf)
                times[name, "fwd_bwd"].append(tb)
    rows = []
    for name, model in models.items():
        model.train()
        mem = (forward_memory(_Loss(candidates[name][1], y), x) / 2**20) if memory else float("nan")
        model.zero_grad(set_to_none=True)
        model.eval()
        rows.append(Row(name, 1e3 * statistics.median(times[name, "fwd"]),
                        1e3 * statistics.median(times[name, "fwd_bwd"]), mem))
    for row in rows:
        row.fwd_vs_dsmoe = row.fwd_ms / rows[0].fwd_ms
        row.fwd_bwd_vs_dsmoe = row.fwd_bwd_ms / rows[0].fwd_bwd_ms
        row.memory_vs_dsmoe = row.memory_mb / rows[0].memory_mb
    result = Result(shape.describe(), impl, diff, rows)
    if new_tokens:
        result.generation, result.same_tokens = bench_generation(ours, hf, shape, new_tokens, prompt,
                                                                 max(1, repeats // 2), seed)
    return result


class _Loss(torch.nn.Module):
    """A loss function as a module of x (forward_memory calls module(x))."""

    def __init__(self, loss, y):
        super().__init__()
        self.loss, self.y = loss, y

    def forward(self, x):
        return self.loss(x, self.y)


@torch.no_grad()
def bench_generation(ours: MoETransformer, hf, shape: Shape, new_tokens: int, prompt: int, repeats: int = 3,
                     seed: int = 0) -> tuple[list[GenRow], bool]:
    """Greedy decoding tokens/s (batch 1, median of repeats): dsmoe cached and uncached, transformers' generate
    (cached)."""
    ours.eval()
    hf.eval()
    if prompt + new_tokens > shape.max_seq_len:
        raise ValueError(f"prompt {prompt} + new tokens {new_tokens} exceed max_seq_len={shape.max_seq_len}")
    idx = torch.randint(0, shape.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(seed + 1))

    def uncached():
        seq = idx
        for _ in range(new_tokens):
            seq = torch.cat([seq, ours(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq

    runs = {
        "dsmoe (latent KV cache)": lambda: ours.generate(idx, new_tokens, temperature=0),
        "dsmoe (no cache)": uncached,
        "transformers (cache)": lambda: hf.generate(idx, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                    do_sample=False),
    }
    outs = {name: fn() for name, fn in runs.items()}  # warmup, and the tokens to compare
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):  # interleaved, the order flipping every repeat
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[name].append(_timed(runs[name]))
    rows = [GenRow(name, new_tokens / statistics.median(t), statistics.median(t)) for name, t in times.items()]
    return rows, all(torch.equal(o, outs["dsmoe (latent KV cache)"]) for o in outs.values())


def format_table(result: Result) -> str:
    lines = [f"{'model':<14} {'fwd ms':>9} {'fwd+bwd ms':>11} {'memory MB':>10} {'fwd x':>7} {'f+b x':>7} "
             f"{'mem x':>7}"]
    for r in result.rows:
        lines.append(f"{r.name:<14} {r.fwd_ms:>9.1f} {r.fwd_bwd_ms:>11.1f} {r.memory_mb:>10.1f} "
                     f"{r.fwd_vs_dsmoe:>7.2f} {r.fwd_bwd_vs_dsmoe:>7.2f} {r.memory_vs_dsmoe:>7.2f}")
    hf = result.rows[-1]
    lines.append(f"\ndsmoe is {hf.fwd_vs_dsmoe:.2f}x as fast as transformers in the forward, "
                 f"{hf.fwd_bwd_vs_dsmoe:.2f}x in forward+backward (training step; target 1.5x: "
                 f"{'met' if hf.fwd_bwd_vs_dsmoe >= 1.5 else 'missed'}), and keeps "
                 f"{1 / hf.memory_vs_dsmoe:.2f}x the training-forward memory")
    if result.generation:
        lines.append(f"\n{'greedy generation':<26} {'tokens/s':>9} {'seconds':>8}")
        lines += [f"{g.name:<26} {g.tokens_per_s:>9.1f} {g.seconds:>8.2f}" for g in result.generation]
        lines.append(f"same tokens from all three: {'yes' if result.same_tokens else 'NO'}")
    return "\n".join(lines)

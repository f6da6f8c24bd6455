"""Small-scale checks of the DeepSeekMoE and Loss-Free Balancing claims: `dsmoe study NAME`.

    balance         no balancing / expert-level aux loss / loss-free bias (sign, proportional) / bias +
                    sequence-wise loss, under sigmoid and softmax gates (Wang et al. 2024)
    shared          0, 1, 2, 4 shared experts at constant total and active parameters (DeepSeekMoE ablations)
    segmentation    m = 1, 2, 4, 8 at constant total and active parameters, with and without a shared
                    expert, next to dense models of the same active and the same total size (DeepSeekMoE)
    specialization  which kinds of token each routed expert takes, and the redundancy test: disable each
                    token's top-1..3 routed experts at inference and measure the rise in loss (DeepSeekMoE)
    all             every study above

Each training run is cached under OUT/runs/<key>/ (key = hash of the model and training configs, the
seed and the corpus' fingerprint), so identical runs are shared between studies and an interrupted
study continues where it stopped.
Each study writes OUT/<study>/results.json, results.md and PNGs.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import dataclasses
import hashlib
import json
import keyword
import math
import re
import shutil
import string
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from dsmoe import plots
from dsmoe.config import ModelConfig

STUDIES = ("balance", "shared", "segmentation", "specialization")

# Training steps per run when --steps is not given. debug: the whole `study all` (54 runs at 2 seeds)
# takes ~15-25 minutes on 2 shared CPU cores; tiny: a longer, more convincing run (hours on a CPU).
DEFAULT_STEPS = {"debug": 1200, "tiny": 1500}

# Segmentation baseline (DeepSeekMoE §3.1): N experts of width F_base, top-K, derived from the preset so
# that the N*F_base total routed width equals the preset's E*F. K=2 as in GShard, the paper's baseline.
BASE_TOP_K = 2
SEGMENTS = (1, 2, 4, 8)
SHARED_COUNTS = (0, 1, 2, 4)
SHARED_STUDY_M = 4          # the shared-expert study sits at the m=4 point of the segmentation family
DISABLE_TOP = (1, 2, 3)     # redundancy test: routed experts disabled per token ...
# ... and the same as shares of the routed experts, which compares models of different granularity at an
# equal share of their routed parameters (disabling 1 of 8 coarse experts ~ 4 of 32 fine ones)
DISABLE_SHARES = (1 / 8, 1 / 4, 3 / 8)

# fields aggregated over seeds, and how the tables show them
METRICS = ("val_ppl", "val_loss", "train_loss", "maxvio_global_mean", "maxvio_global_train", "maxvio_batch_mean",
           "dead_experts",
           "tokens_per_s")
BALANCE_METRICS = ("maxvio_global_mean", "maxvio_global_train", "maxvio_batch_mean", "dead_experts")


@dataclass
class Variant:
    """One configuration of a study; trained once per seed."""

    label: str                  # row name in the table
    group: str                  # section of the table (gate, shared / no shared, ...)
    model: ModelConfig          # what is trained
    info: dict = field(default_factory=dict)  # shape facts shown in the table (m, routed, top_k, ...)


# ---- the studies' configurations ---------------------------------------------------------------------


def _moe(model: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(model, moe=model.moe.replace(**changes))


def balance_variants(base: ModelConfig) -> list[Variant]:
    """Balancing methods x gates. Every other knob stays the preset's."""
    off = dict(bias_update_speed=0.0, aux_loss_alpha=0.0, seq_aux_loss_alpha=0.0)
    out = []
    for gate in ("sigmoid", "softmax"):
        # V3 normalizes the top-k sigmoid weights; DeepSeekMoE / V2 use the raw softmax weights.
        gated = _moe(base, score_func=gate, norm_topk_prob=gate == "sigmoid", **off)
        methods = [
            ("no balancing", {}),
            ("aux loss 1e-3", dict(aux_loss_alpha=1e-3)),
            ("aux loss 1e-2", dict(aux_loss_alpha=1e-2)),
            ("loss-free u=1e-4", dict(bias_update_speed=1e-4)),
            ("loss-free u=1e-3", dict(bias_update_speed=1e-3)),
            ("loss-free u=1e-2", dict(bias_update_speed=1e-2)),
        ]
        if gate == "softmax":  # the rule the Loss-Free paper pairs with softmax gates
            methods.append(("loss-free proportional u=1e-3",
                            dict(bias_update_speed=1e-3, bias_update_rule="proportional")))
        methods.append(("loss-free u=1e-3 + seq aux 1e-4", dict(bias_update_speed=1e-3, seq_aux_loss_alpha=1e-4)))
        out += [Variant(label, gate, _moe(gated, **changes), {"gate": gate}) for label, changes in methods]
    return out


def _segment_base(base: ModelConfig) -> tuple[int, int, int]:
    """(N, K, F_base): N = E/2 experts of width 2F, top-2, so N*F_base is the preset's routed width E*F."""
    moe = base.moe
    return max(2, moe.n_routed_experts // 2), BASE_TOP_K, 2 * moe.expert_dim


def segmented_model(base: ModelConfig, m: int, n_shared: int) -> Variant:
    """The preset's model with its MoE replaced by the m-times segmented baseline, n_shared fine experts shared."""
    from dsmoe.config import MoEConfig

    N, K, F_base = _segment_base(base)
    seg = MoEConfig.segmented(base.dim, N, K, F_base, m, n_shared)
    model = dataclasses.replace(  # the first dense layers keep the active width K*F_base in every variant
        _moe(base, n_routed_experts=seg.n_routed_experts, n_shared_experts=seg.n_shared_experts,
             top_k=seg.top_k, expert_dim=seg.expert_dim), dense_hidden=K * F_base)
    info = {"m": m, "shared": n_shared, "routed": seg.n_routed_experts, "top_k": seg.top_k,
            "expert_dim": seg.expert_dim}
    return Variant(f"m={m}, {n_shared} shared + {seg.n_routed_experts} routed, top-{seg.top_k}",
                   "with a shared expert" if n_shared else "no shared expert", model, info)


def dense_models(base: ModelConfig) -> list[Variant]:
    """Dense models with the MoE family's active width, and with its total width spread over every layer."""
    N, K, F_base = _segment_base(base)
    n_moe = base.n_moe_layers
    n_dense = base.n_layers - n_moe
    total = (n_dense * K * F_base + n_moe * N * F_base) / base.n_layers
    widths = {"dense, same active params": K * F_base, "dense, same total params": 8 * round(total / 8)}
    return [Variant(label, "dense", dataclasses.replace(base, moe=None, first_k_dense=base.n_layers, dense_hidden=w),
                    {"m": 0, "shared": 0, "routed": 0, "top_k": 0, "expert_dim": w})
            for label, w in widths.items()]


def segmentation_variants(base: ModelConfig) -> list[Variant]:
    return [segmented_model(base, m, s) for s in (0, 1) for m in SEGMENTS] + dense_models(base)


def shared_variants(base: ModelConfig) -> list[Variant]:
    variants = [segmented_model(base, SHARED_STUDY_M, s) for s in SHARED_COUNTS]
    for v in variants:
        v.group = f"m={SHARED_STUDY_M}, {v.info['routed'] + v.info['shared']} fine experts, {v.info['top_k'] + v.info['shared']} active"
    return variants


def specialization_variants(base: ModelConfig) -> list[Variant]:
    """The checkpoints examined: the preset itself, and GShard-like vs DeepSeekMoE-like models of equal size."""
    main = Variant("preset (loss-free sigmoid)", "specialization", base)
    gshard = segmented_model(base, 1, 0)
    gshard.label = f"GShard-like: {gshard.label}"
    deepseek = segmented_model(base, SHARED_STUDY_M, 1)
    deepseek.label = f"DeepSeekMoE-like: {deepseek.label}"
    return [main, gshard, deepseek]


VARIANTS = {"balance": balance_variants, "shared": shared_variants, "segmentation": segmentation_variants,
            "specialization": specialization_variants}


# ---- running and caching -----------------------------------------------------------------------------


def run_key(model: ModelConfig, train_cfg, corpus: str) -> str:
    """Content hash of everything that decides a run's result (not where it is written); `corpus` is the
    corpus' fingerprint (dsmoe.data.corpus_fingerprint), so a changed corpus or split trains again."""
    train = {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in ("out", "resume", "tensorboard")}
    blob = json.dumps({"model": model.to_dict(), "train": train, "corpus": corpus}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def run_train_config(base_train, steps: int, seed: int, out: Path):
    """One study run: evaluation at the end, ~60 log points for the MaxVio curves, a final checkpoint."""
    return dataclasses.replace(base_train, steps=steps, seed=seed, out=str(out), resume=None, tensorboard=False,
                               eval_every=0, save_every=0, log_every=max(1, steps // 60))


def maxvio_curve(run_dir: Path) -> dict:
    """MaxVio_batch (mean over MoE layers) and train loss at each logged step."""
    try:
        rows = plots.read_metrics(run_dir)[0]
    except (FileNotFoundError, ValueError):
        return {"step": [], "maxvio_batch": [], "loss": []}
    rows = [r for r in rows if r.get("maxvio")]
    return {"step": [r["step"] for r in rows],
            "maxvio_batch": [sum(r["maxvio"]) / len(r["maxvio"]) for r in rows],
            "loss": [r["loss"] for r in rows]}


def train_split_maxvio(run_dir: Path, batches: int) -> float:
    """MaxVio_global (mean over MoE layers) over as many windows as the evaluation, from the training split.

    Next to the validation MaxVio it separates how well the bias balances the distribution it was fitted
    on from the shift to held-out documents. 0 for a dense model.
    """
    from dsmoe.data import Corpus, load_corpus
    from dsmoe.train import evaluate, load_checkpoint

    model, model_cfg, train_cfg, tokenizer = load_checkpoint(run_dir, "cpu")
    if model_cfg.moe is None:
        return 0.0
    corpus = load_corpus(train_cfg.data, tokenizer)
    as_val = Corpus(corpus.train, corpus.train, corpus.info)  # evaluate() reads the "val" split
    ev = evaluate(model, as_val, train_cfg.batch_size, train_cfg.seq_len or model_cfg.max_seq_len, batches, "cpu")
    return sum(ev["maxvio_global"]) / len(ev["maxvio_global"])


class Runner:
    """Trains (or reuses) runs under root/runs/<key>/, printing one line per run with an ETA."""

    def __init__(self, root: Path, base_train, steps: int, seeds: int, log=None):
        from dsmoe.data import corpus_fingerprint

        self.root, self.base_train, self.steps, self.seeds = Path(root), base_train, steps, seeds
        self.corpus = corpus_fingerprint(base_train.data)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.trained_s: list[float] = []  # wall time of each run trained in this process
        self.pending: set[str] = set()    # keys of the planned runs not trained yet, for the ETA

    def plan(self, variants: list[Variant]) -> None:
        """Note the runs still to train, for the ETA."""
        for v in variants:
            for s in range(self.seeds):
                key = self.train_config(v, s)[1]
                if not (self.root / "runs" / key / "result.json").is_file():
                    self.pending.add(key)

    def train_config(self, variant: Variant, seed_index: int):
        seed = self.base_train.seed + seed_index
        cfg = run_train_config(self.base_train, self.steps, seed, Path("."))
        key = run_key(variant.model, cfg, self.corpus)
        return dataclasses.replace(cfg, out=str(self.root / "runs" / key)), key

    def run(self, variant: Variant, seed_index: int) -> dict:
        """The cached result of one run, training it first if needed."""
        from dsmoe import train as train_mod

        cfg, key = self.train_config(variant, seed_index)
        run_dir = Path(cfg.out)
        cached = run_dir / "result.json"
        if cached.is_file():
            result = json.loads(cached.read_text())
            if "maxvio_global_train" not in result["summary"]:  # a cache written before this metric existed
                result["summary"]["maxvio_global_train"] = train_split_maxvio(run_dir, cfg.eval_batches)
                _write_json(cached, result)
            return result
        if run_dir.exists():  # an interrupted run: start it again from scratch
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        summary = train_mod.train(variant.model, cfg, progress=False)
        summary["maxvio_global_train"] = train_split_maxvio(run_dir, cfg.eval_batches)
        wall = time.perf_counter() - t0
        result = {"key": key, "label": variant.label, "seed": cfg.seed, "wall_s": wall,
                  "summary": _jsonable(summary), "curve": maxvio_curve(run_dir)}
        _write_json(cached, result)  # written last: its presence means the run finished
        self.pending.discard(key)
        self._report(variant, cfg.seed, summary, wall)
        return result

    def _report(self, variant, seed, summary, wall) -> None:
        self.trained_s.append(wall)
        done, left = len(self.trained_s), len(self.pending)
        eta = left * sum(self.trained_s) / done
        self.log(f"[{done}/{done + left}] {variant.label} ({variant.group}) seed {seed}: "
                 f"ppl {summary['val_ppl']:.3f}, MaxVio_global {_fmt(summary.get('maxvio_global_mean'))} "
                 f"in {wall:.0f}s; eta {_duration(eta)}")


def _write_json(path: Path, obj) -> None:
    """Atomically (temp file + rename): an interrupted write never leaves a half file behind."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


def _duration(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def _fmt(x, digits=3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# ---- aggregation -------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> dict:
    """mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "values": values}


def aggregate(variant: Variant, results: list[dict]) -> dict:
    """One table row: shape facts, parameter counts and each metric's spread over seeds."""
    row = {"label": variant.label, "group": variant.group, **variant.info,
           "num_params": variant.model.num_params(), "num_active_params": variant.model.num_active_params(),
           "seeds": [r["seed"] for r in results], "run_keys": [r["key"] for r in results]}
    is_moe = variant.model.moe is not None
    for name in METRICS:
        if name in BALANCE_METRICS and not is_moe:
            continue  # a dense model has no routing to balance
        row[name] = mean_std([float(r["summary"][name]) for r in results])
    if is_moe:
        row["maxvio_batch_final"] = mean_std([_tail_mean(r["curve"]["maxvio_batch"]) for r in results])
        row["curve"] = _mean_curve([r["curve"] for r in results])
    return row


def _tail_mean(values: list[float], fraction: float = 0.1) -> float:
    """Mean of the last `fraction` of a curve: where balance has settled (0 for an empty curve)."""
    tail = values[-max(1, round(len(values) * fraction)):]
    return sum(tail) / len(tail) if tail else 0.0


def _mean_curve(curves: list[dict]) -> dict:
    """Curves averaged over seeds at the steps they share."""
    n = min(len(c["step"]) for c in curves)
    return {"step": curves[0]["step"][:n],
            "maxvio_batch": [sum(c["maxvio_batch"][i] for c in curves) / len(curves) for i in range(n)],
            "loss": [sum(c["loss"][i] for c in curves) / len(curves) for i in range(n)]}


def run_variants(runner: Runner, variants: list[Variant]) -> list[dict]:
    return [aggregate(v, [runner.run(v, s) for s in range(runner.seeds)]) for v in variants]


def _pm(stat: dict | None, digits=3) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if len(stat["values"]) > 1 else f"{stat['mean']:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


# ---- specialization ----------------------------------------------------------------------------------

KINDS = ("keyword", "builtin", "identifier", "digit", "space", "newline", "bracket", "quote", "punctuation",
         "comment", "other", "special")  # other: non-ASCII; special: a tokenizer special such as <|eos|>
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMENT = re.compile(r"#[^\n]*")
_BUILTINS = frozenset(dir(builtins)) | {"self", "cls"}


def char_kinds(text: str) -> list[str]:
    """The kind of every character of Python source (a window of it: no parser needed, regexes only)."""
    kinds = [""] * len(text)
    for m in _WORD.finditer(text):
        w = m.group()
        kind = "keyword" if keyword.iskeyword(w) else "builtin" if w in _BUILTINS else "identifier"
        kinds[m.start():m.end()] = [kind] * (m.end() - m.start())
    for m in _COMMENT.finditer(text):  # a '#' inside a string literal is misread as a comment: rare
        kinds[m.start():m.end()] = ["comment"] * (m.end() - m.start())
    for i, c in enumerate(text):
        if kinds[i]:
            continue
        kinds[i] = ("digit" if c in string.digits else "newline" if c in "\r\n" else "space" if c in " \t"
                    else "bracket" if c in "()[]{}" else "quote" if c in "'\"" else
                    "punctuation" if c in string.punctuation else "other")
    return kinds


def token_kinds(tokens: list[int], tokenizer) -> list[int]:
    """Index into KINDS of every token: the kind of its first character in context."""
    pieces = [tokenizer.decode([t]) for t in tokens]
    kinds = char_kinds("".join(pieces))
    out, pos = [], 0
    for p in pieces:
        out.append(KINDS.index(kinds[pos]) if p else KINDS.index("special"))
        pos += len(p)
    return out


@contextlib.contextmanager
def capture_routing(model):
    """Collects each MoE layer's expert ids [T, K] of every forward, via a hook on its router."""
    ids = [[] for _ in model.moe_layers()]
    hooks = [m.gate.register_forward_hook(lambda mod, inp, out, i=i: ids[i].append(out[1].detach().cpu()))
             for i, m in enumerate(model.moe_layers())]
    try:
        yield ids
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def disable_top_experts(model, n: int):
    """DeepSeekMoE's redundancy test: each token's n top-scoring routed experts are masked, so the router
    picks its next K instead. Done from outside the layer: the router's bias is broadcast per token, and a
    [T, E] bias with -inf on the masked experts removes them from the choice (weights stay the unbiased
    scores of the experts picked)."""
    from dsmoe.router import route

    def masked_forward(gate):
        def forward(x_TD):
            logits_TE = x_TD.float() @ gate.weight.float().T
            _, top_TN, _ = route(logits_TE, gate.bias, gate.cfg.replace(top_k=n))
            mask_TE = logits_TE.new_zeros(logits_TE.shape).scatter_(1, top_TN, float("-inf"))
            return (*route(logits_TE, gate.bias + mask_TE, gate.cfg), logits_TE)
        return forward

    gates = [m.gate for m in model.moe_layers()]
    for g in gates:
        if g.cfg.top_k + n > g.cfg.n_routed_experts:
            raise ValueError(f"cannot disable {n} of {g.cfg.n_routed_experts} experts with top_k={g.cfg.top_k}")
        g.forward = masked_forward(g)
    try:
        yield
    finally:
        for g in gates:
            del g.forward


def routing_by_kind(model, corpus, tokenizer, batch_size, seq_len, batches, seed=0) -> list[list[list[int]]]:
    """Counts [layer][kind][expert] of validation-token assignments."""
    import torch

    counts = [[[0] * m.cfg.n_routed_experts for _ in KINDS] for m in model.moe_layers()]
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), capture_routing(model) as ids:
        for _ in range(batches):
            x_BS, _ = corpus.batch("val", batch_size, seq_len, gen)
            model(x_BS.to(device))
            kinds_T = [k for row in x_BS.tolist() for k in token_kinds(row, tokenizer)]
            for layer, layer_ids in enumerate(ids):
                ids_TK = layer_ids.pop()
                for kind, experts in zip(kinds_T, ids_TK.tolist()):
                    for e in experts:
                        counts[layer][kind][e] += 1
    return counts


def mutual_information(counts_KE: list[list[int]]) -> tuple[float, float]:
    """(I(kind; expert) in bits over assignments, that divided by H(kind)): 0 when routing ignores the kind."""
    total = sum(map(sum, counts_KE))
    pk = [sum(r) / total for r in counts_KE]
    pe = [sum(col) / total for col in zip(*counts_KE)]
    mi = sum(c / total * math.log2(c / total / (pk[k] * pe[e]))
             for k, row in enumerate(counts_KE) for e, c in enumerate(row) if c)
    h = -sum(p * math.log2(p) for p in pk if p)
    return mi, mi / h if h else 0.0


def redundancy(model, corpus, cfg, batches) -> list[dict]:
    """Validation loss with each token's top-n routed experts disabled: n = 0, DISABLE_TOP and DISABLE_SHARES."""
    from dsmoe.train import evaluate

    def loss() -> float:
        return float(evaluate(model, corpus, cfg.batch_size, cfg.seq_len, batches, cfg.device)["loss"])

    base = loss()
    rows = [{"disabled": 0, "loss": base, "rise": 0.0}]
    E, K = model.moe_layers()[0].cfg.n_routed_experts, model.moe_layers()[0].cfg.top_k
    counts = sorted({*DISABLE_TOP, *(round(f * E) for f in DISABLE_SHARES)})
    for n in (n for n in counts if 0 < n and n + K <= E):  # a token needs K experts left to choose from
        with disable_top_experts(model, n):
            value = loss()
        rows.append({"disabled": n, "loss": value, "rise": value - base})
    return rows


def examine(run_dir: Path, batches: int) -> dict:
    """Token-kind routing and the redundancy test for one trained run."""
    from dsmoe.data import load_corpus
    from dsmoe.train import load_checkpoint

    model, model_cfg, train_cfg, tokenizer = load_checkpoint(run_dir, "cpu")
    train_cfg = dataclasses.replace(train_cfg, device="cpu", seq_len=train_cfg.seq_len or model_cfg.max_seq_len)
    corpus = load_corpus(train_cfg.data, tokenizer)
    counts = routing_by_kind(model, corpus, tokenizer, train_cfg.batch_size, train_cfg.seq_len, batches)
    mi = [mutual_information(c) for c in counts]
    return {"kind_counts": counts, "mi_bits": [m[0] for m in mi], "mi_fraction": [m[1] for m in mi],
            "redundancy": redundancy(model, corpus, train_cfg, batches)}


def specialization(runner: Runner, base: ModelConfig, eval_batches: int) -> dict:
    """Trains (or reuses) the examined checkpoints and examines each seed's."""
    variants = VARIANTS["specialization"](base)
    rows = []
    for v in variants:
        results, per_seed = [], []
        for s in range(runner.seeds):
            result = runner.run(v, s)
            results.append(result)
            cache = runner.root / "runs" / result["key"] / "examine.json"
            if not cache.is_file():
                runner.log(f"examining {v.label} seed {result['seed']}")
                _write_json(cache, examine(cache.parent, eval_batches))
            per_seed.append(json.loads(cache.read_text()))
        row = aggregate(v, results)
        row["kind_counts"] = per_seed[0]["kind_counts"]  # the first seed's, for the heatmap
        row["mi_bits"] = mean_std([sum(p["mi_bits"]) / len(p["mi_bits"]) for p in per_seed])
        row["mi_fraction"] = mean_std([sum(p["mi_fraction"]) / len(p["mi_fraction"]) for p in per_seed])
        row["redundancy"] = [{"disabled": x["disabled"], "ratio": x["disabled"] / v.model.moe.n_routed_experts,
                              "loss": mean_std([p["redundancy"][i]["loss"] for p in per_seed]),
                              "rise": mean_std([p["redundancy"][i]["rise"] for p in per_seed])}
                             for i, x in enumerate(per_seed[0]["redundancy"])]
        rows.append(row)
    return {"rows": rows, "kinds": list(KINDS)}


# ---- tables ------------------------------------------------------------------------------------------


def balance_table(rows: list[dict]) -> str:
    header = ["gate", "method", "val ppl", "MaxVio_global", "MaxVio, train windows", "mean MaxVio_batch",
              "MaxVio_batch, last 10%", "dead experts"]
    body = [[r["group"], r["label"], _pm(r["val_ppl"]), _pm(r["maxvio_global_mean"]), _pm(r["maxvio_global_train"]),
             _pm(r["maxvio_batch_mean"]), _pm(r["maxvio_batch_final"]), _pm(r["dead_experts"], 1)] for r in rows]
    return _table(header, body)


def shape_table(rows: list[dict]) -> str:
    header = ["model", "shared", "routed", "top-k", "expert width", "total params", "active params",
              "val ppl", "val loss", "MaxVio_global"]
    body = [[r["label"], str(r["shared"]), str(r["routed"]), str(r["top_k"]), str(r["expert_dim"]),
             _millions(r["num_params"]), _millions(r["num_active_params"]), _pm(r["val_ppl"]),
             _pm(r["val_loss"]), _pm(r.get("maxvio_global_mean"))] for r in rows]
    return _table(header, body)


def specialization_tables(result: dict) -> str:
    rows = result["rows"]
    red_header = ["checkpoint", "val loss", *[f"rise, top-{n} disabled" for n in DISABLE_TOP],
                  *[f"rise, top {Fraction(f).limit_denominator(64)} of routed disabled" for f in DISABLE_SHARES],
                  "I(kind; expert) bits", "share of H(kind)"]
    red = []
    for r in rows:
        rise = {x["disabled"]: x["rise"] for x in r["redundancy"]}
        E = len(r["kind_counts"][0][0])  # routed experts
        red.append([r["label"], _pm(r["redundancy"][0]["loss"]), *[_pm(rise.get(n)) for n in DISABLE_TOP],
                    *[_pm(rise.get(round(f * E))) for f in DISABLE_SHARES], _pm(r["mi_bits"]), _pm(r["mi_fraction"])])
    main = rows[0]
    layer_counts = main["kind_counts"][-1]
    E = len(layer_counts[0])
    tops = []
    for e in range(E):  # the kinds an expert takes most often relative to their overall frequency
        lift = _lift(layer_counts)
        best = sorted(range(len(KINDS)), key=lambda k: -lift[k][e])[:3]
        share = sum(layer_counts[k][e] for k in range(len(KINDS))) / max(1, sum(map(sum, layer_counts)))
        tops.append([str(e), f"{share:.3f}", ", ".join(f"{KINDS[k]} ({lift[k][e]:.1f}x)" for k in best)])
    return (_table(red_header, red) + "\n\nPreset checkpoint, last MoE layer: each expert's share of the "
            "assignments and the token kinds it over-selects (P(expert | kind) / P(expert)):\n\n"
            + _table(["expert", "share", "most over-selected kinds"], tops))


def _lift(counts_KE) -> list[list[float]]:
    """P(expert | kind) / P(expert); 0 where a kind never occurs."""
    total = sum(map(sum, counts_KE))
    pe = [sum(col) / total for col in zip(*counts_KE)]
    return [[(c / sum(row)) / pe[e] if sum(row) and pe[e] else 0.0 for e, c in enumerate(row)] for row in counts_KE]


# ---- plots (matplotlib, Agg backend: files only) -----------------------------------------------------


def plot_maxvio_curves(rows: list[dict], path: Path) -> None:
    """MaxVio_batch over training steps for each method, one panel per gate (the Loss-Free paper's headline plot)."""
    plt = plots.pyplot()
    gates = list(dict.fromkeys(r["group"] for r in rows))
    fig, axes = plt.subplots(1, len(gates), figsize=(7 * len(gates), 4.5), squeeze=False)
    for ax, gate in zip(axes[0], gates):
        for r in (r for r in rows if r["group"] == gate):
            ax.plot(r["curve"]["step"], r["curve"]["maxvio_batch"], label=r["label"],
                    ls="-" if "loss-free" in r["label"] else "--")
        ax.set(title=f"{gate} gate", xlabel="step", ylabel="MaxVio_batch (mean over MoE layers, seeds)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    plots.save(fig, path, dpi=110)


def plot_balance_tradeoff(rows: list[dict], path: Path) -> None:
    """Validation perplexity against MaxVio_global, error bars over seeds."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    methods = list(dict.fromkeys(r["label"] for r in rows))  # one colour per method, one marker per gate
    markers = dict(zip(dict.fromkeys(r["group"] for r in rows), "os^v"))
    for r in rows:
        x, y = r["maxvio_global_mean"], r["val_ppl"]
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt=markers[r["group"]], capsize=3,
                    color=plt.get_cmap("tab10")(methods.index(r["label"]) % 10), label=f"{r['group']}: {r['label']}")
    ax.set(xlabel="MaxVio_global (validation)", ylabel="validation perplexity", xscale="log",
           title="balance vs perplexity, mean ± std over seeds (lower-left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    plots.save(fig, path, dpi=110)


def plot_shape(rows: list[dict], path: Path, x_key: str, xlabel: str, title: str) -> None:
    """Validation perplexity against x_key per group; dense references as horizontal lines."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group in dict.fromkeys(r["group"] for r in rows):
        pts = [r for r in rows if r["group"] == group]
        if group == "dense":
            for r, c in zip(pts, ("tab:gray", "black")):
                ax.axhline(r["val_ppl"]["mean"], color=c, ls=":", label=r["label"])
            continue
        ax.errorbar([r[x_key] for r in pts], [r["val_ppl"]["mean"] for r in pts],
                    yerr=[r["val_ppl"]["std"] for r in pts], marker="o", capsize=3, label=group)
    ax.set(xlabel=xlabel, ylabel="validation perplexity", title=title)
    if x_key == "m":
        ax.set_xscale("log", base=2)
        ax.set_xticks(SEGMENTS, [str(m) for m in SEGMENTS])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plots.save(fig, path, dpi=110)


def plot_kind_heatmap(counts_LKE, label: str, path: Path) -> None:
    """log2 of P(expert | kind) / P(expert) for each MoE layer: red = the kind prefers that expert."""
    plt = plots.pyplot()
    L = len(counts_LKE)
    fig, axes = plt.subplots(L, 1, figsize=(max(6, 0.35 * len(counts_LKE[0][0]) + 3), 3.6 * L), squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        lift = _lift(counts_LKE[layer])
        img = [[math.log2(v) if v > 0 else -3 for v in row] for row in lift]
        im = ax.imshow(img, cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto")
        ax.set(yticks=range(len(KINDS)), yticklabels=KINDS, xlabel="routed expert",
               title=f"{label}: MoE layer {layer + 1}, log2 P(expert|kind)/P(expert)")
        ax.set_xticks(range(len(lift[0])))
        ax.tick_params(axis="x", labelsize=7)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    plots.save(fig, path, dpi=110)


def plot_redundancy(rows: list[dict], path: Path) -> None:
    """Rise of validation loss as each token's top routed experts are disabled (DeepSeekMoE's redundancy test)."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        red = r["redundancy"]
        ax.errorbar([x["ratio"] for x in red], [x["rise"]["mean"] for x in red],
                    yerr=[x["rise"]["std"] for x in red], marker="o", capsize=3, label=r["label"])
    ax.set(xlabel="share of the routed experts disabled per token (its top-scoring ones)",
           ylabel="rise in validation loss (nats)", title="redundancy test: a larger rise = less redundant experts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save(fig, path, dpi=110)


# ---- the studies -------------------------------------------------------------------------------------


def _write(out: Path, name: str, meta: dict, payload: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"study": name, **meta, **payload}, indent=1))
    (out / "results.md").write_text(f"## {name}\n\n{markdown}\n")


def run_study(name: str, base: ModelConfig, runner: Runner, out: Path, meta: dict, eval_batches: int) -> dict:
    """Runs one study and writes OUT/<name>/results.json, results.md and its PNGs."""
    out = out / name
    out.mkdir(parents=True, exist_ok=True)
    if name == "balance":
        rows = run_variants(runner, VARIANTS[name](base))
        plot_maxvio_curves(rows, out / "maxvio_batch.png")
        plot_balance_tradeoff(rows, out / "balance_vs_ppl.png")
        payload, md = {"rows": rows}, balance_table(rows)
    elif name == "shared":
        rows = run_variants(runner, VARIANTS[name](base))
        plot_shape(rows, out / "shared.png", "shared", "shared experts (of the fine experts)",
                   "shared experts at constant total and active parameters")
        payload, md = {"rows": rows}, shape_table(rows)
    elif name == "segmentation":
        rows = run_variants(runner, VARIANTS[name](base))
        plot_shape(rows, out / "segmentation.png", "m", "segmentation factor m",
                   "fine-grained segmentation at constant total and active parameters")
        payload, md = {"rows": rows}, shape_table(rows)
    elif name == "specialization":
        payload = specialization(runner, base, eval_batches)
        plot_kind_heatmap(payload["rows"][0]["kind_counts"], payload["rows"][0]["label"], out / "kinds.png")
        plot_redundancy(payload["rows"], out / "redundancy.png")
        md = specialization_tables(payload)
    else:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)} or all")
    _write(out, name, meta, payload, md)
    runner.log(f"{name}: wrote {out}/results.json, results.md and plots")
    return payload


def study(names: list[str], base: ModelConfig, base_train, steps: int, seeds: int, out: Path,
          log=None) -> dict[str, dict]:
    """Runs the named studies in order, sharing one run cache under out/runs."""
    for name in names:
        if name not in STUDIES:
            raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)} or all")
    if steps < 1 or seeds < 1:
        raise ValueError(f"steps ({steps}) and seeds ({seeds}) must be >= 1")
    if base.moe is None:
        raise ValueError("the studies need an MoE model; the preset has moe=None")
    out = Path(out)
    runner = Runner(out, base_train, steps, seeds, log)
    template = run_train_config(base_train, steps, base_train.seed, out / "runs")  # each run: its seed and key dir
    meta = {"steps": steps, "seeds": seeds, "model": base.to_dict(), "train": _jsonable(dataclasses.asdict(template))}
    for name in names:
        runner.plan(VARIANTS[name](base))
    t0 = time.perf_counter()
    results = {n: run_study(n, base, runner, out, meta, base_train.eval_batches) for n in names}
    runner.log(f"done in {_duration(time.perf_counter() - t0)}; {len(runner.trained_s)} runs trained")
    summary = "\n\n".join((out / n / "results.md").read_text() for n in names)
    (out / "results.md").write_text(summary)
    return results


# ---- command line ------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=(*STUDIES, "all"), help="which study")
    p.add_argument("--preset", default="debug", choices=tuple(DEFAULT_STEPS), help="model size (default debug)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per run (default per preset: {DEFAULT_STEPS})")
    p.add_argument("--seeds", type=int, default=2, help="repetitions of every run, for mean and spread")
    p.add_argument("--out", default=None, help="output folder (default runs/study-<preset>)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these models are too small to gain from more, and "
                        "oversubscribed cores on a shared machine slow every run down many times)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model or training field of the base configuration, as in `dsmoe train`")


def run(args) -> int:
    import torch

    from dsmoe.train import build_configs

    try:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} is invalid: must be >= 1")
        torch.set_num_threads(args.threads)
        model_cfg, train_cfg = build_configs(args.preset, args.sets)
        steps = args.steps if args.steps is not None else DEFAULT_STEPS[args.preset]
        out = Path(args.out or f"runs/study-{args.preset}")
        names = list(STUDIES) if args.name == "all" else [args.name]
        study(names, model_cfg, train_cfg, steps, args.seeds, out)
    except KeyboardInterrupt:
        print("interrupted: finished runs are cached; run the same command again to continue")
        return 130
    except ValueError as e:
        print(f"dsmoe study: error: {e}")
        return 1
    print(f"results: {out}/results.md")
    return 0

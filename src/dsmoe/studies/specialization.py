"""What a trained checkpoint's routed experts specialise in (DeepSeekMoE, arXiv 2401.06066, its analysis of
expert specialization): which kinds of Python token each expert takes, the mutual information between a
token's kind and its experts, and the redundancy test (disable each token's top routed experts and measure
the rise in validation loss: the less redundant the experts, the larger the rise)."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import keyword
import math
import re
import string
from pathlib import Path

import torch

from dsmoe.checkpoint import load_checkpoint
from dsmoe.data import load_corpus
from dsmoe.evaluate import evaluate
from dsmoe.studies.definitions import DISABLE_SHARES, DISABLE_TOP

KINDS = ("keyword", "builtin", "identifier", "digit", "space", "newline", "bracket", "quote", "punctuation",
         "comment", "other", "special")  # other: non-ASCII; special: a tokenizer special such as <|eos|>
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMENT = re.compile(r"#[^\n]*")
_BUILTINS = frozenset(dir(builtins)) | {"self", "cls"}


# ---- token kinds -------------------------------------------------------------------------------------


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


# ---- routing by kind -----------------------------------------------------------------------------------


@contextlib.contextmanager
def capture_routing(model):
    """Collects each MoE layer's expert ids [T, K] of every forward, via a hook on its router."""
    ids: list[list[torch.Tensor]] = [[] for _ in model.moe_layers()]
    hooks = [m.gate.register_forward_hook(lambda mod, inp, out, i=i: ids[i].append(out[1].detach().cpu()))
             for i, m in enumerate(model.moe_layers())]
    try:
        yield ids
    finally:
        for h in hooks:
            h.remove()


def routing_by_kind(model, corpus, tokenizer, batch_size, seq_len, batches, seed=0) -> list[list[list[int]]]:
    """Counts [layer][kind][expert] of validation-token assignments."""
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


def lift(counts_KE: list[list[int]]) -> list[list[float]]:
    """P(expert | kind) / P(expert); 0 where a kind never occurs."""
    total = sum(map(sum, counts_KE))
    pe = [sum(col) / total for col in zip(*counts_KE)]
    return [[(c / sum(row)) / pe[e] if sum(row) and pe[e] else 0.0 for e, c in enumerate(row)] for row in counts_KE]


# ---- the redundancy test -------------------------------------------------------------------------------


@contextlib.contextmanager
def disable_top_experts(model, n: int):
    """Each token's n top-scoring routed experts (bias included) leave the choice, so the router picks its
    next K instead, weighted by their unbiased scores (dsmoe.router.Router.exclude_top)."""
    gates = [m.gate for m in model.moe_layers()]
    for g in gates:  # a token needs K experts left to choose from
        if g.cfg.top_k + n > g.cfg.n_routed_experts:
            raise ValueError(f"cannot disable {n} of {g.cfg.n_routed_experts} experts with top_k={g.cfg.top_k}")
    for g in gates:
        g.exclude_top = n
    try:
        yield
    finally:
        for g in gates:
            g.exclude_top = 0


def redundancy(model, corpus, cfg, batches) -> list[dict]:
    """Validation loss with each token's top-n routed experts disabled: n = 0, DISABLE_TOP and DISABLE_SHARES."""

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
    model, model_cfg, train_cfg, tokenizer = load_checkpoint(run_dir, "cpu")
    train_cfg = dataclasses.replace(train_cfg, device="cpu", seq_len=train_cfg.seq_len or model_cfg.max_seq_len)
    corpus = load_corpus(train_cfg.data, tokenizer)
    counts = routing_by_kind(model, corpus, tokenizer, train_cfg.batch_size, train_cfg.seq_len, batches)
    mi = [mutual_information(c) for c in counts]
    return {"kind_counts": counts, "mi_bits": [m[0] for m in mi], "mi_fraction": [m[1] for m in mi],
            "redundancy": redundancy(model, corpus, train_cfg, batches)}

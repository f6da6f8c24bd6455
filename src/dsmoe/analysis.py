"""Routing analysis of a trained model, after DeepSeekMoE's (arXiv 2401.06066) analysis of expert
specialization: the kind of Python token each assignment carries, counts [layer][kind][expert], the mutual
information between a token's kind and its experts and each expert's lift per kind, and the redundancy test
(disable each token's top routed experts and measure the rise in validation loss: the less redundant the
experts, the larger the rise). `dsmoe inspect` (dsmoe.inspection) and the specialization study
(dsmoe.studies) both build on it.

Shapes: L MoE layers, K kinds (KINDS), E routed experts, T tokens, k experts per token.
"""

from __future__ import annotations

import builtins
import contextlib
import keyword
import math
import re
import string
from collections.abc import Iterator

import torch
from tqdm import tqdm

from dsmoe.data import Corpus
from dsmoe.evaluate import evaluate
from dsmoe.model import MoETransformer

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


def token_kinds(tokens: list[int], tokenizer) -> list[int]:  # tokenizer: dsmoe.data.Tokenizer
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
def capture_routing(model: MoETransformer) -> Iterator[list[list[torch.Tensor]]]:
    """Collects each MoE layer's expert ids [T, K] of every forward, via a hook on its router."""
    ids: list[list[torch.Tensor]] = [[] for _ in model.moe_layers()]
    hooks = [m.gate.register_forward_hook(lambda mod, inp, out, i=i: ids[i].append(out[1].detach().cpu()))
             for i, m in enumerate(model.moe_layers())]
    try:
        yield ids
    finally:
        for h in hooks:
            h.remove()


def add_kind_counts(kinds_LKE: torch.Tensor, ids: list[list[torch.Tensor]], x_BS: torch.Tensor, tokenizer) -> None:
    """Add one forward over x_BS (the last ids [T, k] capture_routing collected for each layer) to the counts
    [L, K, E], by the kind of each assignment's token: one bincount per layer."""
    K, E = kinds_LKE.shape[1:]
    kind_T = torch.tensor([k for row in x_BS.tolist() for k in token_kinds(row, tokenizer)])
    for layer, layer_ids in enumerate(ids):
        ids_Tk = layer_ids.pop()
        cell = kind_T[:, None] * E + ids_Tk  # one (kind, expert) cell per assignment
        kinds_LKE[layer] += torch.bincount(cell.flatten(), minlength=K * E).view(K, E)


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

DISABLE_TOP = (1, 2, 3)     # routed experts disabled per token ...
# ... and the same as shares of the routed experts, which compares models of different granularity at an
# equal share of their routed parameters (disabling 1 of 8 coarse experts ~ 4 of 32 fine ones)
DISABLE_SHARES = (1 / 8, 1 / 4, 3 / 8)


@contextlib.contextmanager
def disable_top_experts(model: MoETransformer, n: int) -> Iterator[None]:
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


def disabled_counts(n_experts: int, top_k: int) -> list[int]:
    """The test's n (top-n experts disabled per token): DISABLE_TOP and the shares DISABLE_SHARES of the routed
    experts, where k experts are left to choose from."""
    counts = sorted({*DISABLE_TOP, *(round(f * n_experts) for f in DISABLE_SHARES)})
    return [n for n in counts if 0 < n and n + top_k <= n_experts]


def redundancy(model: MoETransformer, corpus: Corpus, batches: int, batch_size: int, seq_len: int,
               base_loss: float | None = None, device: str = "cpu", progress: bool = False) -> list[dict]:
    """Validation loss with each token's top-n routed experts disabled (n = 0 first: `base_loss` where the
    caller has it, else evaluated here), and its rise over n = 0."""
    def loss() -> float:
        return float(evaluate(model, corpus, batch_size, seq_len, batches, device)["loss"])

    moe = model.moe_layers()[0].cfg
    base = loss() if base_loss is None else base_loss
    rows = [{"disabled": 0, "share": 0.0, "loss": base, "rise": 0.0}]
    bar = tqdm(disabled_counts(moe.n_routed_experts, moe.top_k), desc="redundancy", unit="eval",
               disable=not progress)
    for n in bar:
        with disable_top_experts(model, n):
            value = loss()
        rows.append({"disabled": n, "share": n / moe.n_routed_experts, "loss": value, "rise": value - base})
        bar.set_postfix(n=n, rise=f"{value - base:.3f}")
    return rows

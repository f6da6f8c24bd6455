"""What a model's routed experts do on a corpus: `inspect(path)` for a HuggingFace DeepSeek-V2/V3 folder
(dsmoe.from_pretrained) or a dsmoe checkpoint / run directory (dsmoe.checkpoint.load_checkpoint).

One pass over evenly spread windows of the corpus' validation split (the windows `dsmoe eval` uses, so a
dsmoe run's numbers here equal its `dsmoe eval` numbers for the same batches) gives, per MoE layer, the load
of every routed expert, MaxVio_global (Loss-Free Balancing §4.1), the dead experts (no token at all), and
the token-kind routing of DeepSeekMoE's specialization analysis (dsmoe.analysis: mutual
information between a token's kind and its experts, lift of each expert for each kind). Then the redundancy
test: the loss on the same windows with each token's top-n routed experts disabled.

The report is OUT/report.md, OUT/results.json and PNGs:

    load.png          layer x expert heatmap of load / mean load (white = balanced)
    kinds.png         per MoE layer, log2 P(expert | kind) / P(expert) (red = the kind prefers the expert)
    redundancy.png    rise of the loss as each token's top routed experts are disabled
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dsmoe import plots
from dsmoe.analysis import KINDS, add_kind_counts, capture_routing, lift, mutual_information, redundancy
from dsmoe.checkpoint import configs_from_checkpoint, is_hf_folder, load_checkpoint, resolve
from dsmoe.data import Corpus, load_corpus
from dsmoe.evaluate import autocast, evaluate
from dsmoe.metrics import dead_experts, load_entropy, max_violation
from dsmoe.model import MoETransformer
from dsmoe.pretrained import from_pretrained, hf_model_config
from dsmoe.tokenizer import load_tokenizer

DEFAULT_SEQ_LEN = 256  # for HF folders, whose max_position_embeddings is far longer than a corpus pass needs
DEFAULT_BATCH_SIZE = 8


@dataclass
class Loaded:
    """A model to inspect, what it came from, and its defaults for the corpus pass."""

    model: MoETransformer
    tokenizer: Any
    kind: str            # "huggingface" or "dsmoe"
    name: str            # the folder's name, for titles and the default output folder
    data: str | None     # default corpus: the run's for a dsmoe checkpoint, None (the stdlib) for HF
    seq_len: int         # default window length: a run's training length, else DEFAULT_SEQ_LEN
    batch_size: int      # default windows per batch: a run's training batch, else DEFAULT_BATCH_SIZE
    default_out: Path


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> Loaded:
    """The model, tokenizer and defaults of a HF folder or a dsmoe checkpoint / run directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (give a HuggingFace DeepSeek-V2/V3 folder or a dsmoe "
                                "checkpoint or run directory)")
    name = path.resolve().name
    if is_hf_folder(path):
        model = from_pretrained(path, dtype=dtype, device=device)
        loaded = Loaded(model, load_tokenizer(path), "huggingface", name, None,
                        min(DEFAULT_SEQ_LEN, model.cfg.max_seq_len), DEFAULT_BATCH_SIZE,
                        Path("runs") / f"inspect-{name}")
    else:
        model, model_cfg, train_cfg, tokenizer = load_checkpoint(path, device)
        if dtype is not None:
            model.to(dtype)
        run_dir = resolve(path) != path  # a run directory holding checkpoint/: the report goes beside it
        loaded = Loaded(model, tokenizer, "dsmoe", name, train_cfg.data, train_cfg.seq_len or model_cfg.max_seq_len,
                        train_cfg.batch_size, path / "inspect" if run_dir else Path("runs") / f"inspect-{name}")
    vocab, model_vocab = loaded.tokenizer.vocab_size, loaded.model.cfg.vocab_size
    # a model's vocabulary may be larger than its tokenizer's (padded, or a folder without a tokenizer, which gets
    # the byte tokenizer's 260 ids), never smaller
    if vocab > model_vocab:
        raise ValueError(f"{path}: the model's vocab_size={model_vocab} does not fit its tokenizer's {vocab} "
                         f"({type(loaded.tokenizer).__name__}; a folder without a tokenizer dsmoe reads gets the "
                         "byte tokenizer)")
    if not loaded.model.moe_layers():
        raise ValueError(f"{path} holds a dense model: there are no routed experts to inspect")
    return loaded


# ---- the corpus pass -----------------------------------------------------------------------------------


def window_starts(corpus: Corpus, batches: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """Starts of batches * batch_size windows spread evenly over the validation split (as dsmoe.evaluate)."""
    return corpus.spread("val", batches * batch_size, seq_len)


@torch.no_grad()
def corpus_pass(model: MoETransformer, corpus: Corpus, tokenizer, batches: int, batch_size: int, seq_len: int,
                device: str = "cpu", progress: bool = True) -> dict:
    """Loss, load [L, E] and token-kind counts [L][kind][expert] over evenly spread validation windows."""
    model.eval()
    L, E = len(model.moe_layers()), model.moe_layers()[0].cfg.n_routed_experts
    load_LE = torch.zeros(L, E, dtype=torch.long)
    kinds_LKE = torch.zeros(L, len(KINDS), E, dtype=torch.long)
    total_loss, n = 0.0, 0
    starts = window_starts(corpus, batches, batch_size, seq_len)
    with capture_routing(model) as ids:
        for i in tqdm(range(0, len(starts), batch_size), desc="corpus pass", unit="batch", disable=not progress):
            x_BS, y_BS = corpus.windows("val", starts[i:i + batch_size], seq_len)
            with autocast(device):
                _, loss = model(x_BS.to(device), y_BS.to(device))
            total_loss += float(loss) * len(x_BS)
            n += len(x_BS)
            load_LE += model.routing_stats()["tokens_per_expert"].cpu().long()
            add_kind_counts(kinds_LKE, ids, x_BS, tokenizer)
    loss = total_loss / n
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n * seq_len, "load": load_LE.tolist(),
            "kind_counts": kinds_LKE.tolist()}


# ---- the whole inspection ------------------------------------------------------------------------------


def inspect(path: str | Path, data: str | None = None, out: str | Path | None = None, batches: int = 16,
            batch_size: int | None = None, seq_len: int | None = None, device: str = "cpu",
            redundancy_batches: int | None = None, progress: bool = True, own_corpus: bool = True) -> dict:
    """Inspect the model at `path` on `data` (default: a dsmoe run's corpus, else the standard library) and
    write the report to `out` (default: RUN/inspect for a run directory, else runs/inspect-<name>).
    batch_size and seq_len default to a run's training shape (so its numbers are `dsmoe eval`'s), else 8 x 256.

    redundancy_batches: batches per redundancy evaluation (default `batches`; 0 skips the test).
    own_corpus=False: data None is the standard library even for a run (compare's both models alike).
    Returns the results (also in OUT/results.json), with the paths of the report and the figures.
    """
    for name, value in (("batches", batches), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} is invalid: must be >= 1")
    loaded = load(path, device)
    model, cfg = loaded.model, loaded.model.cfg
    seq_len, batch_size = seq_len or loaded.seq_len, batch_size or loaded.batch_size
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    corpus = load_corpus(data if data is not None or not own_corpus else loaded.data, loaded.tokenizer)
    corpus.check(seq_len, cfg.vocab_size)
    passed = corpus_pass(model, corpus, loaded.tokenizer, batches, batch_size, seq_len, device, progress)
    load_LE = torch.tensor(passed["load"])
    maxvio = max_violation(load_LE).tolist()
    mi = [mutual_information(c) for c in passed["kind_counts"]]
    rb = batches if redundancy_batches is None else redundancy_batches
    red: list[dict] = []
    if rb:  # the corpus pass's windows are evaluate's: its loss is the base when the batches agree
        base = passed["loss"] if rb == batches else float(evaluate(model, corpus, batch_size, seq_len, rb,
                                                                   device)["loss"])
        red = redundancy(model, corpus, rb, batch_size, seq_len, base, device, progress)
    moe = model.moe_layers()[0].cfg
    result = {
        "path": str(path), "source": loaded.kind, "name": loaded.name,
        "corpus": corpus.info.get("source", "stdlib"), "batches": batches, "batch_size": batch_size,
        "seq_len": seq_len, "device": device,
        "model": {"layers": cfg.n_layers, "first_k_dense": cfg.first_k_dense, "moe_layers": len(maxvio),
                  "routed_experts": moe.n_routed_experts, "top_k": moe.top_k, "shared_experts": moe.n_shared_experts,
                  "score_func": str(moe.score_func), "family": cfg.family or "deepseek",
                  "params": sum(p.numel() for p in model.parameters())},
        "blocks": cfg.moe_blocks,
        **passed,
        "maxvio_global": maxvio, "mean_maxvio_global": sum(maxvio) / len(maxvio),
        "load_entropy": load_entropy(load_LE).tolist(),
        "dead_experts": [torch.nonzero(row == 0).flatten().tolist() for row in load_LE],
        "n_dead_experts": int(dead_experts(load_LE).sum()),
        "mi_bits": [m[0] for m in mi], "mi_fraction": [m[1] for m in mi],
        "lift": [lift(c) for c in passed["kind_counts"]],
        "redundancy": red,
    }
    out = Path(out) if out else loaded.default_out
    result |= write_report(result, out)
    return result


def _defaults(path: str | Path) -> tuple[str | None, int, int, int]:
    """(corpus, seq_len, batch_size, max_seq_len) that `inspect` takes by default for a model, from its configs
    alone (no weights read)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (give a HuggingFace DeepSeek-V2/V3 folder or a dsmoe "
                                "checkpoint or run directory)")
    if is_hf_folder(path):
        cfg = hf_model_config(path)
        return None, min(DEFAULT_SEQ_LEN, cfg.max_seq_len), DEFAULT_BATCH_SIZE, cfg.max_seq_len
    model_cfg, train_cfg = configs_from_checkpoint(resolve(path))
    return train_cfg.data, train_cfg.seq_len or model_cfg.max_seq_len, train_cfg.batch_size, model_cfg.max_seq_len


def compare(paths: list[str | Path], data: str | None = None, out: str | Path | None = None,
            seq_len: int | None = None, batch_size: int | None = None, **kwargs: Any) -> dict:
    """Inspect two models on the same windows of the same corpus (`data`, seq_len and batch_size, by default the
    first model's, the length cut to what both take) and write their routing side by side into OUT/compare.md
    (default runs/compare-A-vs-B); each model's own report goes to OUT/<its folder's name>."""
    if len(paths) != 2:
        raise ValueError(f"compare takes two models, got {len(paths)}")
    (corpus, length, batch, longest), (_, _, _, other) = (_defaults(p) for p in paths)
    data = corpus if data is None else data
    seq_len, batch_size = seq_len or min(length, longest, other), batch_size or batch
    names = [Path(p).resolve().name for p in paths]
    if names[0] == names[1]:
        names = [f"{n}-{i + 1}" for i, n in enumerate(names)]
    out = Path(out) if out else Path("runs") / f"compare-{names[0]}-vs-{names[1]}"
    results = [inspect(p, data, out / name, seq_len=seq_len, batch_size=batch_size, own_corpus=False, **kwargs)
               for p, name in zip(paths, names)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(comparison_markdown(results, names))
    return {"results": results, "report": str(out / "compare.md")}


def comparison_markdown(results: list[dict], names: list[str]) -> str:
    """The two reports' headline numbers in one table (a model's MoE layers averaged; its own report has each)."""
    def row(label: str, values: list[str]) -> str:
        return f"| {label} | " + " | ".join(values) + " |"

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    rows = [
        ("source", [r["source"] for r in results]),
        ("corpus (tokens)", [f"{r['corpus']} ({r['tokens']:,})" for r in results]),
        ("MoE layers x routed experts, top-k", [f"{len(r['blocks'])} x {r['model']['routed_experts']}, "
                                                f"{r['model']['top_k']}" for r in results]),
        ("family", [r["model"].get("family", "deepseek") for r in results]),
        ("score function", [r["model"]["score_func"] for r in results]),
        ("loss / perplexity", [f"{r['loss']:.4f} / {r['ppl']:.2f}" for r in results]),
        ("MaxVio_global, mean (max)", [f"{r['mean_maxvio_global']:.3f} ({max(r['maxvio_global']):.3f})"
                                       for r in results]),
        ("load entropy, mean", [f"{mean(r['load_entropy']):.3f}" for r in results]),
        ("dead experts", [str(r["n_dead_experts"]) for r in results]),
        ("token kind -> expert MI, share of H(kind)", [f"{mean(r['mi_fraction']):.3f}" for r in results]),
        ("redundancy: loss rise, top-1 experts off", [
            f"{r['redundancy'][1]['rise']:+.3f}" if len(r["redundancy"]) > 1 else "-" for r in results]),
    ]
    lines = [f"# Routing of {names[0]} and {names[1]}", "", row("", names), "|---|---|---|",
             *(row(label, values) for label, values in rows), "",
             "Each model's report, per layer and with its figures: "
             + ", ".join(f"[{n}]({n}/report.md)" for n in names) + "."]
    return "\n".join(lines) + "\n"


def write_report(r: dict, out: Path) -> dict:
    """OUT/report.md, OUT/results.json and the PNGs; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    names = [f"block {b}" for b in r["blocks"]]
    figures = [out / "load.png", out / "kinds.png"]
    plots.plot_load_heatmap(r["load"], names, f"{r['name']}: expert load over {r['tokens']:,} tokens "
                            f"(load / mean; 1 = balanced)", figures[0])
    plots.plot_kind_lift(r["lift"], KINDS, r["name"], figures[1], names)
    if r["redundancy"]:
        figures.append(out / "redundancy.png")
        plots.plot_redundancy([{"label": r["name"], "redundancy": [
            {"ratio": x["share"], "rise": {"mean": x["rise"], "std": 0.0}} for x in r["redundancy"]]}], figures[-1])
    paths = {"report": str(out / "report.md"), "results": str(out / "results.json"),
             "figures": [str(f) for f in figures]}
    (out / "report.md").write_text(markdown(r, [f.name for f in figures]))
    (out / "results.json").write_text(json.dumps(r | paths, indent=1))
    return paths


def _top_lifts(counts_KE: list[list[int]], lift_KE: list[list[float]], n: int = 5, min_count: int = 20) -> str:
    """The n (kind, expert) pairs of highest lift among cells with at least min_count assignments."""
    cells = [(lift_KE[k][e], KINDS[k], e) for k, row in enumerate(counts_KE) for e, c in enumerate(row)
             if c >= min_count]
    return ", ".join(f"{kind}->{e} {v:.1f}x" for v, kind, e in sorted(cells, reverse=True)[:n]) or "-"


def _ranges(blocks: list[int]) -> str:
    """1-3, 5, 7-9"""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def markdown(r: dict, figures: list[str]) -> str:
    m = r["model"]
    lines = [
        f"# Inspection of {r['name']}", "",
        f"- source: {r['source']} ({r['path']})",
        f"- model: {m['layers']} blocks, {m['moe_layers']} MoE layers (blocks {_ranges(r['blocks'])}) of "
        f"{m['routed_experts']} routed experts (top-{m['top_k']}, {m['score_func']}) + {m['shared_experts']} shared; "
        f"{m['params']:,} parameters",
        f"- corpus: {r['corpus']}, validation split, {r['batches']} batches of {r['batch_size']} x {r['seq_len']} "
        f"tokens ({r['tokens']:,} tokens, windows spread evenly); loss {r['loss']:.4f}, perplexity {r['ppl']:.2f}",
        f"- MaxVio_global: mean **{r['mean_maxvio_global']:.3f}** over the MoE layers; "
        f"dead experts (no token): **{r['n_dead_experts']}**", "",
        "## Load per MoE layer", "",
        "| block | MaxVio_global | min / mean load | max / mean load | load entropy | dead experts | "
        "I(kind; expert) bits | I / H(kind) | strongest kind->expert lifts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, block in enumerate(r["blocks"]):
        load = r["load"][i]
        mean = sum(load) / len(load)
        dead = r["dead_experts"][i]
        lines.append(f"| {block} | {r['maxvio_global'][i]:.3f} | {min(load) / mean:.2f} | {max(load) / mean:.2f} | "
                     f"{r['load_entropy'][i]:.3f} | {', '.join(map(str, dead)) if dead else '-'} | "
                     f"{r['mi_bits'][i]:.3f} | {r['mi_fraction'][i]:.3f} | "
                     f"{_top_lifts(r['kind_counts'][i], r['lift'][i])} |")
    lines += ["", "MaxVio_global = (max load - mean load) / mean load over the whole pass; load entropy 1 = even. "
              "Lift = P(expert | kind) / P(expert), over cells with at least 20 assignments (DeepSeekMoE's "
              "specialization analysis; kinds: " + ", ".join(KINDS) + ").", ""]
    if r["redundancy"]:
        lines += ["## Redundancy test", "",
                  "Each token's top-n routed experts (by biased score) leave the choice; the router takes its next "
                  "K. A larger rise of the loss means less redundant experts (DeepSeekMoE §4.2).", "",
                  "| disabled per token | share of routed experts | loss | rise |", "|---|---|---|---|"]
        lines += [f"| {x['disabled']} | {x['share']:.3f} | {x['loss']:.4f} | {x['rise']:+.4f} |"
                  for x in r["redundancy"]]
        lines.append("")
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"

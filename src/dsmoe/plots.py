"""Every figure: a training run's balance and loss curves, and the studies'.

The only module that imports matplotlib (Agg backend: files only, no display needed). `dsmoe report`
plots a run's DIR/metrics.jsonl into DIR/plots/:

    loss.png            train loss (and its running mean) and validation loss over steps
    maxvio.png          MaxVio_batch per MoE layer over steps, MaxVio_global of each evaluation as points
    load_final.png      layer x expert load / mean load at the end of training (last evaluation)
    load_evolution.png  the same heatmap averaged over windows of training steps, early to late
    load_over_time.png  per layer, expert x step heatmap of each logged training batch's load / mean

A perfectly balanced layer has load / mean = 1 (white) for every expert and MaxVio = 0.

`dsmoe study` plots its rows (dsmoe.studies): MaxVio curves, balance vs perplexity (mean ± std, and one
point per seed beside the Loss-Free paper's points), perplexity vs model shape, the expert x token-kind
heatmap and the redundancy test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dsmoe.runtime import optional_import

SNAPSHOTS = 6  # panels in load_evolution.png


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of run_dir/metrics.jsonl, each sorted by step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: is {run_dir} a run directory written by `dsmoe train`?")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON ({e.msg})") from None
    train = sorted((r for r in rows if r.get("kind") == "train"), key=lambda r: r["step"])
    evals = sorted((r for r in rows if r.get("kind") == "eval"), key=lambda r: r["step"])
    if not train and not evals:
        raise ValueError(f"{path} has no train or eval rows to plot")
    return train, evals


def layer_names(run_dir: str | Path, n_layers: int) -> list[str]:
    """Names of the MoE layers: their block index when the run's config.json tells which blocks are dense."""
    try:
        model = json.loads((Path(run_dir) / "config.json").read_text())["model"]
        dense = set(model.get("dense_layers") or [])
        first = model["first_k_dense"]
        blocks = [i for i in range(first, model.get("n_layers", first + n_layers)) if i not in dense]
        return [f"block {b}" for b in blocks[:n_layers]]
    except (OSError, KeyError, TypeError, ValueError):
        return [f"MoE layer {i}" for i in range(n_layers)]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    matplotlib = optional_import("matplotlib", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path, dpi: int = 120) -> None:
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def _relative_load(load_LE) -> np.ndarray:
    """load / mean load of each layer (1 = balanced); a layer that routed nothing stays 0."""
    load = np.asarray(load_LE, dtype=float)
    mean = load.mean(axis=1, keepdims=True)
    return np.divide(load, mean, out=np.zeros_like(load), where=mean > 0)


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# ----------------------------------------------------------------------------- a run's figures


def plot_loss(plt, train, evals, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps, loss = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="train (per log step)")
        window = max(1, len(loss) // 20)
        if window > 1:
            ax.plot(steps, _running_mean(loss, window), color="tab:blue", lw=2,
                    label=f"train (mean of {window} log steps)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:red", lw=2,
                label="validation")
        last = evals[-1]
        ax.annotate(f"val {last['val_loss']:.3f} (ppl {last.get('val_ppl', math.exp(last['val_loss'])):.2f})",
                    (last["step"], last["val_loss"]), textcoords="offset points", xytext=(-10, 12), ha="right",
                    color="tab:red")
    ax.set(title="Language-model loss", xlabel="optimizer step", ylabel="cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save(fig, path)


def plot_maxvio(plt, train, evals, names: list[str], path: Path) -> None:
    n_layers = len(names)
    cmap = plt.get_cmap("viridis")
    colors = [cmap(i / max(1, n_layers - 1)) for i in range(n_layers)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for layer in range(n_layers):
        if train:
            ax.plot([r["step"] for r in train], [r["maxvio"][layer] for r in train], color=colors[layer],
                    alpha=0.8, lw=1.2, label=f"{names[layer]}: MaxVio_batch")
        if evals:
            ax.plot([r["step"] for r in evals], [r["maxvio_global"][layer] for r in evals], "D",
                    color=colors[layer], markeredgecolor="black", ms=6,
                    label=f"{names[layer]}: MaxVio_global" if not train else None)
    if train and evals:  # one legend entry for the diamonds: their colour already names the layer
        ax.plot([], [], "D", color="white", markeredgecolor="black", label="diamonds: MaxVio_global (validation set)")
    if evals:
        final = evals[-1]["maxvio_global"]
        ax.set_title(f"Load imbalance (MaxVio); final global: mean {sum(final) / len(final):.3f}, "
                     f"max {max(final):.3f}")
    else:
        ax.set_title("Load imbalance (MaxVio_batch)")
    values = [v for r in train for v in r["maxvio"]] + [v for r in evals for v in r["maxvio_global"]]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")  # imbalance falls over orders of magnitude under loss-free balancing
    ax.set(xlabel="optimizer step", ylabel="MaxVio = (max load - mean) / mean")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2 if n_layers > 3 else 1)
    fig.tight_layout()
    save(fig, path)


def _heatmap(ax, rel_LE, names, title):
    from matplotlib.ticker import MaxNLocator
    im = ax.imshow(rel_LE, aspect="auto", cmap="RdBu_r", vmin=0, vmax=2, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_yticks(range(len(names)), names)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("routed expert")
    return im


def plot_load_final(plt, train, evals, names, path: Path) -> None:
    row = evals[-1] if evals else train[-1]
    rel = _relative_load(row["load"])
    where = "validation set" if evals else "last training batch"
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * rel.shape[1] + 3), max(3, 1.2 + 0.6 * rel.shape[0])))
    im = _heatmap(ax, rel, names, f"Expert load at step {row['step']} ({where}); 1 = balanced")
    fig.colorbar(im, ax=ax, label="tokens / mean tokens per expert", extend="max")
    fig.tight_layout()
    save(fig, path)


def _windows(train: list[dict], n: int) -> list[list[dict]]:
    """Split the train rows into n consecutive windows (fewer when there are fewer rows)."""
    n = min(n, len(train))
    bounds = [round(i * len(train) / n) for i in range(n + 1)]
    return [train[a:b] for a, b in zip(bounds, bounds[1:])]


def plot_load_evolution(plt, train, names, path: Path) -> None:
    windows = _windows(train, SNAPSHOTS)
    cols = min(3, len(windows))
    rows = math.ceil(len(windows) / cols)
    L, E = np.asarray(train[0]["load"]).shape
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 1.5, (0.5 * L + 1.6) * rows), squeeze=False)
    for ax, window in zip(axes.flat, windows):
        load = np.sum([r["load"] for r in window], axis=0)
        im = _heatmap(ax, _relative_load(load), names, f"steps {window[0]['step']}-{window[-1]['step']}")
    for ax in axes[:, 1:].flat:  # layer names once per row of panels
        ax.tick_params(labelleft=False)
    for ax in axes.flat[len(windows):]:
        ax.axis("off")
    fig.suptitle("Expert load over training (tokens / mean, summed over each window of steps)")
    fig.tight_layout()
    fig.colorbar(im, ax=axes, label="tokens / mean tokens per expert", extend="max", shrink=0.9)
    save(fig, path)


def plot_load_over_time(plt, train, names, path: Path) -> None:
    """One panel per layer: experts (rows) x logged steps (columns), coloured by load / mean."""
    from matplotlib.ticker import MaxNLocator
    steps = [r["step"] for r in train]
    load_NLE = np.asarray([r["load"] for r in train], dtype=float)
    N, L, E = load_NLE.shape
    fig, axes = plt.subplots(L, 1, figsize=(9, (0.06 * E + 0.9) * L + 1), sharex=True, squeeze=False)
    half = (steps[-1] - steps[0]) / max(1, N - 1) / 2  # each column centred on its step
    for layer, ax in enumerate(axes[:, 0]):
        im = ax.imshow(_relative_load(load_NLE[:, layer]).T, aspect="auto", cmap="RdBu_r", vmin=0, vmax=2,
                       interpolation="nearest", origin="lower",
                       extent=(steps[0] - half, steps[-1] + half, -0.5, E - 0.5))
        ax.set_ylabel(f"{names[layer]}\nexpert")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle("Expert load per training batch over steps (tokens / mean; white = balanced)")
    fig.tight_layout()
    fig.colorbar(im, ax=axes, label="tokens / mean tokens per expert", extend="max", shrink=0.9)
    save(fig, path)


# ----------------------------------------------------------------------------- every figure of a run (`dsmoe report`)


def report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write every plot the run's metrics allow to out_dir (default run_dir/plots); returns their paths."""
    train, evals = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    written = [out / "loss.png"]
    plot_loss(plt, train, evals, written[0])
    has_moe = bool(train and train[0].get("maxvio")) or bool(evals and evals[0].get("maxvio_global"))
    if not has_moe:  # a dense twin: nothing is routed
        return written
    names = layer_names(run_dir, len(train[0]["maxvio"]) if train else len(evals[0]["maxvio_global"]))
    plot_maxvio(plt, train, evals, names, out / "maxvio.png")
    plot_load_final(plt, train, evals, names, out / "load_final.png")
    written += [out / "maxvio.png", out / "load_final.png"]
    if train and train[0].get("load"):
        plot_load_evolution(plt, train, names, out / "load_evolution.png")
        plot_load_over_time(plt, train, names, out / "load_over_time.png")
        written += [out / "load_evolution.png", out / "load_over_time.png"]
    return written


# ----------------------------------------------------------------------------- the studies' figures
# Each row is one variant aggregated over seeds (dsmoe.studies.runner.aggregate): a metric is
# {"mean", "std", ...}; "group" is the table section (the gate, shared / no shared, dense, ...).


def plot_maxvio_curves(rows: list[dict], path: Path) -> None:
    """MaxVio_batch over training steps for each method, one panel per gate (the Loss-Free paper's headline plot)."""
    plt = pyplot()
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
    save(fig, path, dpi=110)


def plot_balance_tradeoff(rows: list[dict], path: Path) -> None:
    """Validation perplexity against MaxVio_global, error bars over seeds."""
    plt = pyplot()
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
    save(fig, path, dpi=110)


# The Loss-Free Balancing paper's main results (Wang et al. 2024, arXiv 2408.15664; 2 shared + 64 routed
# experts, top-6, sigmoid gate): (model, method, validation perplexity, MaxVio_global).
LOSS_FREE_PAPER = (("1B", "aux loss", 9.56, 0.72), ("1B", "loss-free", 9.50, 0.04),
                   ("3B", "aux loss", 7.97, 0.52), ("3B", "loss-free", 7.92, 0.04))


def _method_color(label: str, plt):
    """One colour family per kind of method: grey none, blue/purple aux loss (raw P red), green loss-free."""
    if label.startswith("no balancing"):
        return "0.45"
    if label.startswith("aux loss"):
        strong = "1e-2" in label
        if "raw P" in label:
            return "tab:red" if strong else "lightcoral"
        return "tab:blue" if strong else "lightskyblue"
    shades = plt.get_cmap("Greens")
    if "seq aux" in label:
        return "tab:olive"
    if "proportional" in label:
        return "tab:cyan"
    speed = {"1e-4": 0.45, "1e-3": 0.7, "1e-2": 0.95}
    return shades(next((v for k, v in speed.items() if k in label), 0.7))


def plot_balance_seeds(rows: list[dict], path: Path) -> None:
    """Validation perplexity against MaxVio_global, one point per seed (small) and the mean (large, edged),
    beside the Loss-Free paper's points on their own perplexity axis (another corpus and scale: only the
    MaxVio axis, shared, compares)."""
    plt = pyplot()
    fig, (ax, paper) = plt.subplots(1, 2, figsize=(14, 5.5), sharex=True, gridspec_kw=dict(width_ratios=[3, 1.3]))
    markers = dict(zip(dict.fromkeys(r["group"] for r in rows), "o^sv"))
    for r in rows:
        color, marker = _method_color(r["label"], plt), markers[r["group"]]
        xs, ys = r["maxvio_global_mean"]["values"], r["val_ppl"]["values"]
        ax.scatter(xs, ys, color=color, marker=marker, s=22, alpha=0.75)
        ax.scatter([r["maxvio_global_mean"]["mean"]], [r["val_ppl"]["mean"]], color=color, marker=marker, s=90,
                   edgecolors="black", linewidths=0.8, label=f"{r['group']}: {r['label']} (n={len(xs)})")
    seeds = max(len(r["val_ppl"]["values"]) for r in rows)
    ax.set(xlabel="MaxVio_global (validation; lower = better balanced)", ylabel="validation perplexity (ours)",
           xscale="log", title=f"this study: one small point per seed, edged = mean of {seeds} seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(-0.02, -0.12), ncol=3, frameon=False)
    for model, marker in (("1B", "D"), ("3B", "s")):
        pts = {m: (v, p) for name, m, p, v in LOSS_FREE_PAPER if name == model}
        for method, (x, y) in pts.items():
            paper.scatter([x], [y], marker=marker, s=70, edgecolors="black",
                          color="tab:blue" if method == "aux loss" else _method_color("loss-free u=1e-3", plt),
                          label=f"{model} {method}: ppl {y:.2f}, MaxVio {x:.2f}")
        (x0, y0), (x1, y1) = pts["aux loss"], pts["loss-free"]
        paper.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color="0.4"))
    paper.set(xlabel="MaxVio_global", ylabel="perplexity on the paper's corpus (not comparable with ours)",
              title="Loss-Free Balancing paper, 1B and 3B\n(2 shared + 64 routed, top-6, sigmoid)")
    paper.grid(alpha=0.3, which="both")
    paper.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    save(fig, path, dpi=110)


def plot_shape(rows: list[dict], path: Path, x_key: str, xlabel: str, title: str,
               log2_ticks: tuple[int, ...] = ()) -> None:
    """Validation perplexity against x_key per group; dense references as horizontal lines. With log2_ticks
    the x axis is log2 with a tick at each (the segmentation factors m, which double from point to point)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group in dict.fromkeys(r["group"] for r in rows):
        pts = sorted((r for r in rows if r["group"] == group), key=lambda r: r[x_key])
        if group == "dense":
            for r, c in zip(pts, ("tab:gray", "black")):
                ax.axhline(r["val_ppl"]["mean"], color=c, ls=":", label=r["label"])
            continue
        ax.errorbar([r[x_key] for r in pts], [r["val_ppl"]["mean"] for r in pts],
                    yerr=[r["val_ppl"]["std"] for r in pts], marker="o", capsize=3, label=group)
    ax.set(xlabel=xlabel, ylabel="validation perplexity", title=title)
    if log2_ticks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(log2_ticks, [str(m) for m in log2_ticks])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path, dpi=110)


def plot_redundancy(rows: list[dict], path: Path) -> None:
    """Rise of validation loss as each token's top routed experts are disabled (DeepSeekMoE's redundancy test)."""
    plt = pyplot()
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
    save(fig, path, dpi=110)


# ----------------------------------------------------------------------------- a model's figures (`dsmoe inspect`)


def plot_load_heatmap(load_LE, names: list[str], title: str, path: Path) -> None:
    """Layer x expert load / mean load of one pass over a corpus (white = balanced, blue = starved)."""
    plt = pyplot()
    rel = _relative_load(load_LE)
    L, E = rel.shape
    fig, ax = plt.subplots(figsize=(min(24, max(6, 0.25 * E + 3)), min(30, max(3, 1.2 + 0.35 * L))))
    im = _heatmap(ax, rel, names, title)
    fig.colorbar(im, ax=ax, label="tokens / mean tokens per expert", extend="max")
    fig.tight_layout()
    save(fig, path)


def plot_kind_lift(lift_LKE: list[list[list[float]]], kinds: tuple[str, ...], label: str, path: Path,
                   names: list[str] | None = None) -> None:
    """log2 P(expert | kind) / P(expert), one panel per MoE layer (`names`, default "MoE layer i"; at most 8,
    spread evenly over the layers, for models with many): red = the kind prefers that expert."""
    plt = pyplot()
    L, E = len(lift_LKE), len(lift_LKE[0][0])
    names = names or [f"MoE layer {i + 1}" for i in range(L)]
    shown = sorted({round(i * (L - 1) / 7) for i in range(8)}) if L > 8 else list(range(L))
    fig, axes = plt.subplots(len(shown), 1, figsize=(min(24, max(6, 0.3 * E + 3)), 3.2 * len(shown)), squeeze=False)
    for layer, ax in zip(shown, axes[:, 0]):
        img = [[math.log2(v) if v > 0 else -3 for v in row] for row in lift_LKE[layer]]
        im = ax.imshow(img, cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto", interpolation="nearest")
        ax.set(yticks=range(len(kinds)), yticklabels=kinds, xlabel="routed expert",
               title=f"{label}: {names[layer]}, log2 P(expert|kind)/P(expert)")
        if E <= 64:
            ax.set_xticks(range(E))
        ax.tick_params(axis="x", labelsize=7)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save(fig, path, dpi=110)


def plot_layer_sweep(rows: list[dict], path: Path, where: str) -> None:
    """The layer's time over the dense FFN's along each swept axis (`dsmoe bench layer --sweep`): below 1 the
    MoE is cheaper than a dense layer of its active width."""
    plt = pyplot()
    axes_names = list(dict.fromkeys(r["axis"] for r in rows))
    fig, axes = plt.subplots(1, len(axes_names), figsize=(5 * len(axes_names), 4), squeeze=False)
    labels = {"tokens": "tokens in the batch", "experts": "routed experts (K, F fixed)", "top_k": "top-k (F fixed)"}
    for ax, name in zip(axes[0], axes_names):
        pts = [r for r in rows if r["axis"] == name]
        for key, label in (("fwd_vs_dense", "forward"), ("fwd_bwd_vs_dense", "forward+backward")):
            ax.plot([r["value"] for r in pts], [r[key] for r in pts], "o-", label=label)
        ax.axhline(1.0, color="gray", ls=":")
        ax.set_xscale("log", base=2)
        ax.set(xlabel=labels.get(name, name), ylabel="time / dense FFN time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MoE layer vs dense FFN of equal active width; {where}", fontsize=9)
    fig.tight_layout()
    save(fig, path, dpi=110)

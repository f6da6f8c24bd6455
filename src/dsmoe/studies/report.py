"""The studies' markdown tables, from the aggregated rows (each metric a mean ± std over seeds)."""

from __future__ import annotations

from fractions import Fraction

from dsmoe.analysis import DISABLE_SHARES, DISABLE_TOP, KINDS, lift


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


def upcycle_table(rows: list[dict]) -> str:
    """The upcycle study: each arm's size, tokens seen in all, and validation loss before and after its run."""
    header = ["model", "total params", "active params", "steps in all", "tokens in all", "val loss at its start",
              "val loss", "val ppl", "MaxVio_global"]
    body = [[r["label"], _millions(r["num_params"]), _millions(r["num_active_params"]), str(r["steps"]),
             f"{r['tokens']:,}", _pm(r["init_val_loss"]), _pm(r["val_loss"]),
             _pm(r["val_ppl"]), _pm(r.get("maxvio_global_mean"))] for r in rows]
    return _table(header, body)


def specialization_tables(result: dict) -> str:
    """The redundancy test and mutual information per checkpoint, then the preset's experts by token kind."""
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
    layer_counts = rows[0]["kind_counts"][-1]
    lift_KE = lift(layer_counts)
    tops = []
    for e in range(len(layer_counts[0])):  # the kinds an expert takes most often relative to their overall frequency
        best = sorted(range(len(KINDS)), key=lambda k: -lift_KE[k][e])[:3]
        share = sum(layer_counts[k][e] for k in range(len(KINDS))) / max(1, sum(map(sum, layer_counts)))
        tops.append([str(e), f"{share:.3f}", ", ".join(f"{KINDS[k]} ({lift_KE[k][e]:.1f}x)" for k in best)])
    return (_table(red_header, red) + "\n\nPreset checkpoint, last MoE layer: each expert's share of the "
            "assignments and the token kinds it over-selects (P(expert | kind) / P(expert)):\n\n"
            + _table(["expert", "share", "most over-selected kinds"], tops))


def _pm(stat: dict | None, digits=3) -> str:
    """mean ± std over seeds (the mean alone for one seed); "-" for a metric the row does not have."""
    if stat is None:
        return "-"
    mean = f"{stat['mean']:.{digits}f}"
    return f"{mean} ± {stat['std']:.{digits}f}" if len(stat["values"]) > 1 else mean


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"

"""Training the studies' runs, caching them, aggregating them over seeds, and `study()`, which runs whole studies.

A run is cached under OUT/runs/<key>/ (key = run_key(): the model and training configs, the seed and the
corpus' fingerprint); its result.json is written last, so its presence means the run finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

from dsmoe import plots
from dsmoe.analysis import KINDS, lift
from dsmoe.checkpoint import load_checkpoint
from dsmoe.config import ModelConfig, TrainConfig
from dsmoe.data import corpus_fingerprint, load_corpus
from dsmoe.evaluate import evaluate
from dsmoe.studies.definitions import SEGMENTS, STUDIES, VARIANTS, Variant
from dsmoe.studies.report import balance_table, shape_table, specialization_tables, upcycle_table
from dsmoe.studies.specialization import examine
from dsmoe.train import train

# fields aggregated over seeds, and those only a routed model has
METRICS = ("val_ppl", "val_loss", "train_loss", "maxvio_global_mean", "maxvio_global_train", "maxvio_batch_mean",
           "dead_experts", "tokens_per_s")
BALANCE_METRICS = ("maxvio_global_mean", "maxvio_global_train", "maxvio_batch_mean", "dead_experts")


# ---- one run ------------------------------------------------------------------------------------------


# fields that do not change what a run computes: where it writes, what it reports, runtime checks
NOT_IN_KEY = {"out", "resume", "tensorboard", "overwrite", "check_inputs"}


def run_key(model: ModelConfig, train_cfg: TrainConfig, corpus: str) -> str:
    """Content hash of everything that decides a run's result (not where it is written); `corpus` is the
    corpus' fingerprint (dsmoe.data.corpus_fingerprint), so a changed corpus or split trains again. Fields
    at their defaults are left out, so a new option that defaults to the old behaviour keeps the cache."""
    blob = json.dumps({"model": _changed(model), "train": _changed(train_cfg), "corpus": corpus},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _changed(cfg) -> dict:
    """The fields of a config dataclass that differ from their defaults (nested configs recursively)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in NOT_IN_KEY:
            continue
        if dataclasses.is_dataclass(value):
            out[f.name] = _changed(value)
        elif f.default is not dataclasses.MISSING and value == f.default:
            continue
        elif f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        else:
            out[f.name] = value
    return out


def run_train_config(base_train: TrainConfig, steps: int, seed: int, out: Path) -> TrainConfig:
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
    model, model_cfg, train_cfg, tokenizer = load_checkpoint(run_dir, "cpu")
    if model_cfg.moe is None:
        return 0.0
    corpus = load_corpus(train_cfg.data, tokenizer)
    seq_len = train_cfg.seq_len or model_cfg.max_seq_len
    ev = evaluate(model, corpus, train_cfg.batch_size, seq_len, batches, "cpu", split="train")
    return sum(ev["maxvio_global"]) / len(ev["maxvio_global"])


class Runner:
    """Trains (or reuses) runs under root/runs/<key>/, printing one line per run with an ETA."""

    def __init__(self, root: Path, base_train: TrainConfig, steps: int, seeds: int, log=None):
        self.root, self.base_train, self.steps, self.seeds = Path(root), base_train, steps, seeds
        self.corpus = corpus_fingerprint(base_train.data)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.trained_s: list[float] = []  # wall time of each run trained in this process
        self.pending: set[str] = set()    # keys of the planned runs not trained yet, for the ETA

    def plan(self, variants: list[Variant], **options) -> None:
        """Note the runs still to train (each variant at every seed, with train_config's options), for the ETA."""
        for v in variants:
            for s in range(self.seeds):
                key = self.train_config(v, s, **options)[1]
                if not (self.root / "runs" / key / "result.json").is_file():
                    self.pending.add(key)

    def train_config(self, variant: Variant, seed_index: int, steps: int | None = None, seed_offset: int = 0,
                     init: str | None = None) -> tuple[TrainConfig, str]:
        """A run's config and cache key: the study's steps unless `steps`, seed base + seed_index + seed_offset,
        and optionally the weights of a HuggingFace folder `init` (relative to the study's folder: the key does
        not depend on where the study is)."""
        seed = self.base_train.seed + seed_index + seed_offset
        cfg = dataclasses.replace(run_train_config(self.base_train, steps or self.steps, seed, Path(".")), init=init)
        key = run_key(variant.model, cfg, self.corpus)
        return dataclasses.replace(cfg, out=str(self.root / "runs" / key),
                                   init=str(self.root / init) if init else None), key

    def run(self, variant: Variant, seed_index: int, **options) -> dict:
        """The cached result of one run (train_config's options), training it first if needed."""
        cfg, key = self.train_config(variant, seed_index, **options)
        assert cfg.out is not None  # train_config sets it
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
        summary = train(variant.model, cfg, progress=False)
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


# ---- aggregation over seeds ----------------------------------------------------------------------------


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
    """One aggregated row per variant, each trained (or reused) at every seed."""
    return [aggregate(v, [runner.run(v, s) for s in range(runner.seeds)]) for v in variants]


def specialization(runner: Runner, base: ModelConfig, eval_batches: int) -> dict:
    """Trains (or reuses) the examined checkpoints and examines each seed's (cached beside its run)."""
    rows = []
    for v in VARIANTS["specialization"](base):
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
        moe = v.model.moe
        assert moe is not None  # the specialization variants are MoE models
        row["redundancy"] = [{"disabled": x["disabled"], "ratio": x["disabled"] / moe.n_routed_experts,
                              "loss": mean_std([p["redundancy"][i]["loss"] for p in per_seed]),
                              "rise": mean_std([p["redundancy"][i]["rise"] for p in per_seed])}
                             for i, x in enumerate(per_seed[0]["redundancy"])]
        rows.append(row)
    return {"rows": rows, "kinds": list(KINDS)}


# ---- the studies ---------------------------------------------------------------------------------------


def run_study(name: str, base: ModelConfig, runner: Runner, out: Path, meta: dict, eval_batches: int) -> dict:
    """Runs one study and writes OUT/<name>/results.json, results.md and its PNGs."""
    out = out / name
    out.mkdir(parents=True, exist_ok=True)
    if name in ("balance", "balance-core"):
        rows = run_variants(runner, VARIANTS[name](base))
        plots.plot_maxvio_curves(rows, out / "maxvio_batch.png")
        plots.plot_balance_tradeoff(rows, out / "balance_vs_ppl.png")
        plots.plot_balance_seeds(rows, out / "balance_seeds.png")
        payload, md = {"rows": rows}, balance_table(rows)
    elif name == "shared":
        rows = run_variants(runner, VARIANTS[name](base))
        plots.plot_shape(rows, out / "shared.png", "shared", "shared experts (of the fine experts)",
                         "shared experts at constant total and active parameters")
        payload, md = {"rows": rows}, shape_table(rows)
    elif name in ("segmentation", "segmentation-core"):
        rows = run_variants(runner, VARIANTS[name](base))
        plots.plot_shape(rows, out / "segmentation.png", "m", "segmentation factor m",
                         "fine-grained segmentation at constant total and active parameters", log2_ticks=SEGMENTS)
        payload, md = {"rows": rows}, shape_table(rows)
    elif name == "upcycle":
        from dsmoe.studies.upcycle import upcycle_study  # it builds on this module's Runner

        payload = upcycle_study(runner, base)
        plots.plot_shape(payload["points"], out / "upcycle.png", "tokens", "tokens seen in all",
                         "a dense model upcycled vs continued vs the MoE from scratch")
        md = upcycle_table(payload["rows"])
    elif name == "specialization":
        payload = specialization(runner, base, eval_batches)
        main = payload["rows"][0]
        plots.plot_kind_lift([lift(c) for c in main["kind_counts"]], KINDS, main["label"], out / "kinds.png")
        plots.plot_redundancy(payload["rows"], out / "redundancy.png")
        md = specialization_tables(payload)
    else:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)} or all")
    _write(out, name, meta, payload, md)
    runner.log(f"{name}: wrote {out}/results.json, results.md and plots")
    return payload


def study(names: list[str], base: ModelConfig, base_train: TrainConfig, steps: int, seeds: int, out: Path,
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
        if name == "upcycle":  # its arms continue from the dense runs: their keys follow from those
            from dsmoe.studies.upcycle import plan_upcycle

            plan_upcycle(runner, base)
        else:
            runner.plan(VARIANTS[name](base))
    t0 = time.perf_counter()
    results = {n: run_study(n, base, runner, out, meta, base_train.eval_batches) for n in names}
    runner.log(f"done in {_duration(time.perf_counter() - t0)}; {len(runner.trained_s)} runs trained")
    summary = "\n\n".join((out / n / "results.md").read_text() for n in names)
    (out / "results.md").write_text(summary)
    return results


# ---- files and formatting ------------------------------------------------------------------------------


def _write(out: Path, name: str, meta: dict, payload: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"study": name, **meta, **payload}, indent=1))
    (out / "results.md").write_text(f"## {name}\n\n{markdown}\n")


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

"""The upcycling study (`dsmoe study upcycle`): given a trained dense model and some extra tokens, is it better to
upcycle it into a DeepSeekMoE (dsmoe.upcycle) and go on training, to go on training the dense model, or to train
the same MoE from scratch?

Per seed, a dense GQA model in Llama's format (the preset's dense twin: the MoE's active FFN width, half as many
key/value heads as query heads) trains the study's steps (N1). Then, each for N1/2 more steps (N2) on the same
windows (a data seed of their own, apart from the pretraining's), with the same schedule:

    (a) upcycled   the dense model upcycled into the preset's MoE shape (its E routed experts of its width, its
                   shared ones, top-K: granularity K + S) in every block; it starts at the dense model's loss
    (b) scratch    the same MoE architecture from a random init, on those N2 steps' tokens alone
    (c) dense      the dense model, continued
    (d) scratch, as many tokens as (a)  the same MoE from scratch for N1 + N2 steps: (b) saw fewer tokens in all

The MoE arms train loss-free (the preset's bias_update_speed), as DeepSeek-V3.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from dsmoe.checkpoint import load_checkpoint
from dsmoe.config import ModelConfig
from dsmoe.pretrained import save_pretrained
from dsmoe.studies.definitions import Variant, upcycle_setup, upcycle_variants
from dsmoe.studies.runner import Runner, aggregate, mean_std
from dsmoe.upcycle import UpcycleConfig, upcycle

CONTINUE_SEED_OFFSET = 1000  # the extra tokens' data seed: other windows than the pretraining's first N2


def _arm_options(arm: str, runner: Runner, folders: dict[str, str]) -> dict[str, Any]:
    """train_config's options of an arm (folders: the dense run's HuggingFace folders, relative to the study)."""
    extra = max(1, runner.steps // 2)
    continued: dict[str, Any] = {"steps": extra, "seed_offset": CONTINUE_SEED_OFFSET}
    options: dict[str, dict[str, Any]] = {
        "pretrain": {}, "upcycled": continued | {"init": folders["upcycled"]}, "scratch": continued,
        "dense": continued | {"init": folders["dense"]}, "scratch-all": {"steps": runner.steps + extra}}
    return options[arm]


def _folders(runner: Runner, pretrain: Variant, seed_index: int) -> dict[str, str]:
    """The dense run's HuggingFace folders, relative to the study's folder: the dense model and its upcycling."""
    key = runner.train_config(pretrain, seed_index)[1]
    return {"dense": f"runs/{key}/hf-dense", "upcycled": f"runs/{key}/hf-upcycled"}


def _export(runner: Runner, run_dir: Path, folders: dict[str, str], spec: UpcycleConfig) -> None:
    """The dense run's final weights as a Llama folder, and upcycled by spec as a glm4_moe one; each written beside
    and renamed into place, so a folder that exists is whole."""
    dense = None
    for name, relative in folders.items():
        path = runner.root / relative
        if path.is_dir():
            continue
        if dense is None:
            dense = load_checkpoint(run_dir, "cpu")[0]
        model = dense if name == "dense" else upcycle(dense, spec)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp)
        tmp.rename(path)


def plan_upcycle(runner: Runner, base: ModelConfig) -> None:
    """Note the study's runs still to train, for the ETA (the arms' keys follow from the dense run's)."""
    pretrain, *arms = upcycle_variants(base)
    runner.plan([pretrain])
    for s in range(runner.seeds):
        folders = _folders(runner, pretrain, s)
        for v in arms:
            key = runner.train_config(v, s, **_arm_options(v.info["arm"], runner, folders))[1]
            if not (runner.root / "runs" / key / "result.json").is_file():
                runner.pending.add(key)


def upcycle_study(runner: Runner, base: ModelConfig) -> dict:
    """Trains (or reuses) every arm at every seed: a row per arm (and the dense pretraining), and points of
    validation perplexity against the tokens seen in all, for plots.plot_shape."""
    variants = upcycle_variants(base)
    pretrain, arms = variants[0], variants[1:]
    _, spec = upcycle_setup(base)
    results: dict[str, list[dict]] = {v.info["arm"]: [] for v in variants}
    for s in range(runner.seeds):
        dense_result = runner.run(pretrain, s)
        results["pretrain"].append(dense_result)
        folders = _folders(runner, pretrain, s)
        router_seed = dataclasses.replace(spec, seed=dense_result["seed"])  # the dense run's seed
        _export(runner, runner.root / "runs" / dense_result["key"], folders, router_seed)
        for v in arms:
            results[v.info["arm"]].append(runner.run(v, s, **_arm_options(v.info["arm"], runner, folders)))
    tokens_per_step = runner.base_train.batch_size * runner.base_train.grad_accum * \
        (runner.base_train.seq_len or base.max_seq_len)
    rows = []
    for v in variants:
        row = aggregate(v, results[v.info["arm"]])
        steps = {"pretrain": 0, "scratch": 0, "scratch-all": 0}.get(v.info["arm"], runner.steps)
        steps += results[v.info["arm"]][0]["summary"]["steps"]
        row |= {"tokens": steps * tokens_per_step, "steps": steps,
                "init_val_loss": mean_std([r["summary"]["init_val_loss"] for r in results[v.info["arm"]]]),
                "init_val_ppl": mean_std([r["summary"]["init_val_ppl"] for r in results[v.info["arm"]]])}
        rows.append(row)
    return {"rows": rows, "points": _points(rows), "upcycle": dataclasses.asdict(spec),
            "tokens_per_step": tokens_per_step}


def _points(rows: list[dict]) -> list[dict]:
    """Validation perplexity against tokens seen in all, a line per model: the dense model before and after its
    extra tokens, the upcycled MoE from where it started (the dense model's loss) to its end, the MoE from scratch
    after the extra tokens alone and after as many as (a)."""
    by_arm = {r["arm"]: r for r in rows}
    pre, up = by_arm["pretrain"], by_arm["upcycled"]

    def point(group: str, row: dict, key: str = "val_ppl", tokens: int | None = None) -> dict:
        return {"group": group, "label": row["label"], "tokens": row["tokens"] if tokens is None else tokens,
                "val_ppl": row[key]}
    return [point("dense, continued", pre), point("dense, continued", by_arm["dense"]),
            point("upcycled MoE", up, "init_val_ppl", pre["tokens"]), point("upcycled MoE", up),
            point("MoE from scratch", by_arm["scratch"]), point("MoE from scratch", by_arm["scratch-all"])]

"""Expert-Specialized Fine-Tuning (ESFT; Wang et al., "Let the Expert Stick to His Last", arXiv 2407.01906).

A task's tokens go to few experts of each MoE layer, and different tasks to different ones; ESFT fine-tunes
only the experts a task uses and freezes everything else. Before training, the task's data is routed through
the base model and every expert of every MoE layer is scored (paper §3.2, N_s windows of L tokens, K experts a
token, g_{i,t} the gate value: the token's affinity to expert i if i is among its routed experts, else 0):

    gate  (ESFT-Gate, average gate score):     g_i = 1/N_s sum_windows 1/L sum_tokens g_{i,t}
    token (ESFT-Token, token selection ratio): r_i = 1/N_s sum_windows 1/L sum_tokens 1(g_{i,t} > 0) / K

Per layer the experts are sorted by score, highest first, and kept until their scores sum to at least p (the
smallest such set; at least one expert). Only the kept experts train (optionally the shared experts, and "the
rest": attention, embeddings, norms, routers, dense FFNs, the head, MTP modules); the adapter holds just those
tensors, under their HuggingFace keys, and merges back into the base folder.

Choices where the paper leaves room (deepseek-ai/ESFT's scripts checked):
- affinities: the router's scores normalized per token over all E experts. For a softmax gate (the paper's
  DeepSeek-V2-Lite) that is the gate value itself; a sigmoid gate's scores are normalized as DeepSeek-V3 does
  for its balance loss, so that a token's gate mass is at most 1 whatever the score function. The experts are
  those the model routes to (balancing bias and group limit included).
- the scores are not renormalized per layer: p applies to g_i and r_i as defined (the r_i of a layer sum to 1,
  its g_i to the routed share of the gate mass). The released generate_expert_config.py divides by a sum over
  layers (deepseek-ai/ESFT issue #17); the paper's formulas do not, and neither does dsmoe.
- an expert with score 0 (no scored token chose it) is never kept: where a layer's scores sum to less than p
  (possible with `gate`), every expert with a nonzero score is kept.
- ties in score go to the lower expert id; sums reach p within 1e-9 (their float rounding).

Frozen means bit-identical: frozen tensors get no gradient at all; the routed experts of a layer are one
[E, ...] tensor, so its frozen rows get a zeroed gradient (a hook, before clipping) and no weight decay (the
tensor moves to an AdamW group without decay, and the kept rows decay by hand before each step, as AdamW
would: p *= 1 - lr * weight_decay). The balancing bias stays the base's (`moe.bias_update_speed` must be 0).

Shapes: T tokens, E routed experts, K experts per token, L MoE layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dsmoe.config import ModelConfig, TrainConfig
from dsmoe.data import Corpus
from dsmoe.evaluate import autocast
from dsmoe.experts import GroupedExperts
from dsmoe.model import Block, MoETransformer
from dsmoe.moe import MoE
from dsmoe.paths import folder_file
from dsmoe.pretrained import _headers, _shards, key_map, read_json

REACH_TOLERANCE = 1e-9       # a sum within this of p has reached it (float rounding of the scores' sums)
SELECTION_FILE = "esft.json"  # in the run directory: the experts a run trains (read again on --resume)
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
ADAPTER_FORMAT = "dsmoe-esft-adapter"


class AdapterError(ValueError):
    """An adapter folder that is incomplete, or does not belong to the base folder it is merged into."""


# ---- the selection rule ----------------------------------------------------------------------------------------

def select_experts(scores_E: Sequence[float], top_p: float) -> list[int]:
    """The experts ESFT keeps in one layer, highest score first: the fewest whose scores sum to >= top_p.

    Sorted by score descending (ties: lower id first) and added while the sum is below top_p; experts with
    score 0 are never added, so a layer whose scores sum to less than top_p keeps all its nonzero ones."""
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} is invalid: must be a number in (0, 1]")
    scores = [float(s) for s in scores_E]
    if not scores or not all(math.isfinite(s) and s >= 0 for s in scores):
        raise ValueError(f"expert scores must be a non-empty list of finite numbers >= 0, got {scores_E!r}")
    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    kept: list[int] = []
    for e in order:
        if kept and (scores[e] == 0 or math.fsum(scores[k] for k in kept) >= top_p - REACH_TOLERANCE):
            break
        kept.append(e)
    return kept


@dataclass
class Selection:
    """What an ESFT run trains: per MoE layer (its index in model.layers, as in the HF keys) the kept experts,
    highest score first, and every expert's score; the settings that chose them."""

    score: str                       # "gate" or "token"
    top_p: float                     # each layer's kept experts sum to at least this score
    train_shared: bool               # the shared experts train too
    train_rest: bool                 # everything but the routed and shared experts trains too
    experts: dict[int, list[int]]    # layer -> kept expert ids
    scores: dict[int, list[float]]   # layer -> [E] scores the experts were chosen by
    tokens: int                      # tokens scored
    trained_params: int = 0          # parameters that train (filled by freeze)
    total_params: int = 0

    @classmethod
    def choose(cls, scores: dict[int, list[float]], cfg: TrainConfig, tokens: int) -> Selection:
        experts = {layer: select_experts(s, cfg.esft_top_p) for layer, s in scores.items()}
        return cls(cfg.esft, cfg.esft_top_p, cfg.esft_train_shared, cfg.esft_train_rest, experts, scores, tokens)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["experts"] = {str(k): v for k, v in self.experts.items()}
        d["scores"] = {str(k): v for k, v in self.scores.items()}
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str) -> Selection:
        try:
            sel = cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
            sel.experts = {int(k): [int(e) for e in v] for k, v in sel.experts.items()}
            sel.scores = {int(k): [float(s) for s in v] for k, v in sel.scores.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AdapterError(f"{source} is not an ESFT selection ({type(e).__name__}: {e})") from None
        return sel

    def settings_differ(self, cfg: TrainConfig) -> list[str]:
        mine = {"esft": self.score, "esft_top_p": self.top_p, "esft_train_shared": self.train_shared,
                "esft_train_rest": self.train_rest}
        return [f"{k}={v!r} (requested {getattr(cfg, k)!r})" for k, v in mine.items() if getattr(cfg, k) != v]

    def describe(self) -> str:
        """One line: the method, and per MoE layer how many experts are kept (which ones for a few)."""
        E = len(next(iter(self.scores.values()))) if self.scores else 0
        per_layer = ", ".join(f"{layer}: {len(kept)}/{E}" + (f" {sorted(kept)}" if len(kept) <= 4 else "")
                              for layer, kept in self.experts.items())
        extra = " + shared experts" * self.train_shared + " + the rest of the model" * self.train_rest
        share = self.trained_params / max(self.total_params, 1)
        return (f"ESFT-{self.score.capitalize()} (p={self.top_p:g}, scored on {self.tokens:,} tokens): experts "
                f"trained per MoE layer {per_layer}{extra} | {self.trained_params:,} of {self.total_params:,} "
                f"parameters train ({share:.1%})")

    def summary(self) -> dict[str, Any]:
        return {"score": self.score, "top_p": self.top_p, "train_shared": self.train_shared,
                "train_rest": self.train_rest, "experts": {str(k): v for k, v in self.experts.items()},
                "experts_per_layer": [len(v) for v in self.experts.values()], "score_tokens": self.tokens,
                "trained_params": self.trained_params, "total_params": self.total_params}


# ---- scoring ---------------------------------------------------------------------------------------------------

def moe_blocks(model: MoETransformer) -> list[tuple[int, MoE]]:
    """(index in model.layers, layer) of the model's own MoE blocks (the MTP modules' count as the rest)."""
    return [(i, b.ffn) for i, b in enumerate(model.layers) if isinstance(b, Block) and isinstance(b.ffn, MoE)]


@torch.no_grad()
def expert_scores(model: MoETransformer, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                  device: str = "cpu") -> tuple[dict[int, list[float]], dict[int, list[float]], int]:
    """(gate scores, token selection ratios, tokens): per MoE layer, each expert's score over the batches'
    tokens (x_BS and optional docs_BS), routed as the model routes them (eval mode, the run's autocast)."""
    layers = moe_blocks(model)
    E = layers[0][1].cfg.n_routed_experts if layers else 0
    gate_LE = torch.zeros(len(layers), E, dtype=torch.float64, device=device)
    count_LE = torch.zeros(len(layers), E, dtype=torch.float64, device=device)
    slots_L = torch.zeros(len(layers), dtype=torch.float64, device=device)  # assignments: T*K per layer

    def record(row: int) -> Any:
        def hook(module: nn.Module, inputs: Any, out: tuple[torch.Tensor, ...]) -> None:
            _, ids_TK, scores_TE, _ = out
            affinity_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp(min=1e-30)  # normalized per token
            gate_LE[row].index_add_(0, ids_TK.flatten(), affinity_TE.gather(1, ids_TK).flatten().double())
            count_LE[row].index_add_(0, ids_TK.flatten(), torch.ones(ids_TK.numel(), dtype=torch.float64,
                                                                      device=ids_TK.device))
            slots_L[row] += ids_TK.numel()
        return hook

    handles = [layer.gate.register_forward_hook(record(row)) for row, (_, layer) in enumerate(layers)]
    was_training, tokens = model.training, 0
    model.eval()
    try:
        for x_BS, docs_BS in batches:
            with autocast(device):
                model(x_BS.to(device), docs_BS=None if docs_BS is None else docs_BS.to(device))
            tokens += x_BS.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    gate_LE /= max(tokens, 1)
    token_LE = count_LE / slots_L.clamp(min=1).unsqueeze(1)  # 1(chosen) / K, averaged over tokens
    gate = {i: gate_LE[row].tolist() for row, (i, _) in enumerate(layers)}
    token = {i: token_LE[row].tolist() for row, (i, _) in enumerate(layers)}
    return gate, token, tokens


def score_batches(corpus: Corpus, cfg: TrainConfig, seq_len: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The run's first esft_score_batches training batches: windows drawn as the loop draws them (a generator
    seeded like its data RNG, which stays untouched), with their documents under doc_mask."""
    rng = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.esft_score_batches):
        starts_B = corpus.sample("train", cfg.batch_size, seq_len, rng)
        if cfg.doc_mask:
            x, _, docs = corpus.windows_with_docs("train", starts_B, seq_len)
            yield x, docs
        else:
            yield corpus.windows("train", starts_B, seq_len)[0], None


# ---- a run -----------------------------------------------------------------------------------------------------

def check_config(model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """What TrainConfig cannot check alone: ESFT needs routed experts, and keeps the base model's routing."""
    if not cfg.esft:
        return
    if model_cfg.moe is None:
        raise ValueError(f"esft={cfg.esft!r} is invalid: ESFT trains a model's routed experts, and this model has "
                         "no MoE layers (a dense model); fine-tune it without esft")
    if model_cfg.moe.bias_update_speed:
        raise ValueError(f"moe.bias_update_speed={model_cfg.moe.bias_update_speed!r} is invalid with "
                         f"esft={cfg.esft!r}: ESFT keeps the base model's routing, balancing bias included; "
                         "set moe.bias_update_speed=0 (train --init does, with esft)")


def selection_for_run(model: MoETransformer, cfg: TrainConfig, corpus: Corpus, seq_len: int, device: str,
                      run_dir: Path, world: int = 1) -> Selection:
    """A new run scores the base model on its data and writes RUN/esft.json; a resumed one reads it back."""
    if world > 1:
        raise ValueError(f"esft={cfg.esft!r} runs in one process for now (launched on {world}): its frozen "
                         "expert rows are not split over ranks; run it without torchrun")
    path = run_dir / SELECTION_FILE
    if cfg.resume:
        if not path.is_file():
            raise AdapterError(f"{path} is missing: the resumed ESFT run's selection of experts is kept there")
        selection = Selection.from_dict(json.loads(path.read_text()), str(path))
        differ = selection.settings_differ(cfg)
        if differ:
            raise ValueError(f"the run chose its experts with other ESFT settings: {'; '.join(differ)}; a resumed "
                             "run keeps its experts (drop those --set)")
        return selection
    gate, token, tokens = expert_scores(model, score_batches(corpus, cfg, seq_len), device)
    selection = Selection.choose(gate if cfg.esft == "gate" else token, cfg, tokens)
    path.write_text(json.dumps(selection.to_dict(), indent=1))
    return selection


def freeze(model: MoETransformer, selection: Selection) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Only the selection trains: requires_grad off elsewhere, and a hook that zeroes the gradient of each
    frozen expert's rows. Returns the [E, ...] expert tensors that train in part, with their kept rows (for
    keep_frozen_rows); fills selection.trained_params / total_params."""
    for p in model.parameters():
        p.requires_grad_(selection.train_rest)
    partial: list[tuple[nn.Parameter, torch.Tensor]] = []
    partial_numel = 0
    for i, layer in moe_blocks(model):
        experts = layer.experts
        if not isinstance(experts, GroupedExperts):
            raise ValueError(f"esft needs the routed experts as one GroupedExperts per layer, got "
                             f"{type(experts).__name__} in layer {i}")
        E = layer.cfg.n_routed_experts
        keep_E = torch.zeros(E, dtype=torch.bool)
        keep_E[selection.experts[i]] = True
        for w in (experts.w_gate, experts.w_up, experts.w_down):
            w.requires_grad_(True)
            if not keep_E.all():
                frozen = (~keep_E).to(w.device).view(-1, *[1] * (w.dim() - 1))
                w.register_hook(lambda g, frozen=frozen: g.masked_fill(frozen, 0))
                partial.append((w, keep_E.nonzero().squeeze(1).to(w.device)))
                partial_numel += w.numel() - w[0].numel() * int(keep_E.sum())
        for shared in (layer.shared_experts, layer.shared_expert_gate):
            for p in shared.parameters() if shared is not None else ():
                p.requires_grad_(selection.train_shared)
    params = {id(p): p for p in model.parameters()}.values()  # a tied head once
    selection.total_params = sum(p.numel() for p in params)
    selection.trained_params = sum(p.numel() for p in params if p.requires_grad) - partial_numel
    return partial


def keep_frozen_rows(optimizer: torch.optim.Optimizer, partial: list[tuple[nn.Parameter, torch.Tensor]],
                     weight_decay: float) -> None:
    """AdamW decays every row of a tensor it updates, gradient or not: the partly trained expert tensors move
    to a group without decay, and their kept rows decay by hand just before each step (p *= 1 - lr * wd, as
    AdamW does first). With zero gradients from the start, Adam's moments of the frozen rows stay 0, and so
    does their update. Call before the scheduler is built (it reads the groups)."""
    if not partial:
        return
    ids = {id(p) for p, _ in partial}
    decayed = False
    for group in optimizer.param_groups:
        decayed |= group["weight_decay"] > 0 and any(id(p) in ids for p in group["params"])
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.add_param_group({"params": [p for p, _ in partial], "weight_decay": 0.0})
    if not (decayed and weight_decay):
        return
    first = partial[0][0]

    def decay_kept_rows(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # the group looked up at each step: a resumed optimizer's load_state_dict replaces the group dicts
        group = next(g for g in opt.param_groups if any(p is first for p in g["params"]))
        factor = 1 - group["lr"] * weight_decay
        with torch.no_grad():
            for p, rows in partial:
                if p.grad is not None:
                    p[rows] = p[rows] * factor

    optimizer.register_step_pre_hook(decay_kept_rows)


def metrics_row(selection: Selection) -> dict[str, Any]:
    """The run's metrics.jsonl row of its selection (step 0)."""
    return {"kind": "esft", "step": 0, **selection.summary()}


# ---- the adapter -----------------------------------------------------------------------------------------------

# every family's names (dsmoe.families): DeepSeek's mlp.experts.E.gate_proj, Mixtral's block_sparse_moe.experts.E.w1;
# shared_experts, or Qwen2-MoE's shared_expert and shared_expert_gate
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                     r"(?:gate_proj|up_proj|down_proj|w1|w2|w3)\.weight")
_SHARED = re.compile(r"model\.layers\.(\d+)\.mlp\.shared_experts?(?:_gate)?\.")


def trained_keys(keys: Iterable[str], selection: Selection) -> list[str]:
    """The HF keys of the tensors an ESFT run trains (freeze's rule, by name): the kept experts of each scored
    layer; its shared experts with train_shared; every other key with train_rest, except the balancing bias."""
    out = []
    for key in keys:
        if (m := _EXPERT.fullmatch(key)) and int(m[1]) in selection.experts:
            trained = int(m[2]) in selection.experts[int(m[1])]
        elif (m := _SHARED.match(key)) and int(m[1]) in selection.experts:
            trained = selection.train_shared
        else:
            trained = selection.train_rest and not key.endswith(".e_score_correction_bias")
        if trained:
            out.append(key)
    return out


def save_adapter(model: MoETransformer, selection: Selection, out_dir: str | Path, base_dir: str | Path) -> Path:
    """OUT/adapter.safetensors (the trained tensors, HF keys, the model's dtype) and OUT/adapter.json (the
    selection, its scores, and the base folder's identity: its config's SHA-256 and that of the base's own
    tensors under the adapter's keys, which merge_adapter checks)."""
    out, base = Path(out_dir), Path(base_dir)
    slots = key_map(model)
    keys = trained_keys(slots, selection)
    tensors = {k: slots[k].read().detach().contiguous().cpu().clone() for k in keys}
    files = _weight_files(base)
    missing = [k for k in keys if k not in files]
    if missing:
        raise AdapterError(f"the base folder {base} has no key {missing[0]} (of {len(missing)}): the adapter "
                           "must come from the base it was trained from")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"format": ADAPTER_FORMAT, "version": 1, **selection.to_dict(), "keys": len(keys),
              "base": {"path": str(base), "config_sha256": _file_sha256(folder_file(base, "config.json")),
                       "tensors_sha256": _tensors_sha256(base, keys, files)}}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """(adapter.json, path of adapter.safetensors), checked to be an ESFT adapter."""
    folder = Path(adapter_dir)
    config_path, weights = folder_file(folder, ADAPTER_CONFIG), folder_file(folder, ADAPTER_WEIGHTS)
    if not config_path.is_file() or not weights.is_file():
        raise AdapterError(f"{folder} is not an ESFT adapter: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                           "(a run trained with --set esft=... writes them into RUN/esft)")
    config = read_json(folder, ADAPTER_CONFIG)
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{config_path} is not an ESFT adapter's config (format {ADAPTER_FORMAT!r})")
    Selection.from_dict(config, str(config_path))  # well-formed
    return config, weights


def load_adapter(model: MoETransformer, adapter_dir: str | Path) -> MoETransformer:
    """Write an adapter's tensors into a model of its base (in memory; every key and shape checked first)."""
    _, weights = read_adapter(adapter_dir)
    slots = key_map(model)
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
        for key in keys:
            shape = tuple(f.get_slice(key).get_shape())
            if key not in slots or slots[key].shape != shape:
                raise AdapterError(f"{weights}: {key} {shape} is not a tensor of this model"
                                   + (f" (its shape is {slots[key].shape})" if key in slots else ""))
        with torch.no_grad():
            for key in keys:
                slots[key].write(f.get_tensor(key))
    return model


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base_dir: str | Path | None = None) -> Path:
    """A full HuggingFace folder: the base folder (by default the one the adapter records) with the adapter's
    tensors in place of its own, each in the base's dtype, shard by shard (one shard in memory at a time);
    every other file copied. The base must be the one the adapter was trained from (its tensors' SHA-256)."""
    config, weights = read_adapter(adapter_dir)
    base = Path(base_dir if base_dir is not None else config["base"]["path"])
    out = Path(out_dir)
    if out.resolve() == base.resolve():
        raise AdapterError(f"--out {out} is the base folder: merge into a new folder")
    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"{out} exists and is not empty: choose a new folder for the merged model")
    files = _weight_files(base)
    with safe_open(str(weights), "pt") as f:
        adapter = {k: f.get_tensor(k) for k in f.keys()}
    _check_base(base, files, adapter, config)
    out.mkdir(parents=True, exist_ok=True)
    shards = set(files.values())
    for item in sorted(base.iterdir()):
        if item.is_file() and item not in shards:
            shutil.copyfile(folder_file(base, item.name), out / item.name)
    for shard in sorted(shards):
        with safe_open(str(shard), "pt") as f:
            tensors = {k: (adapter[k].to(t.dtype) if k in adapter else t)
                       for k in f.keys() for t in [f.get_tensor(k)]}
            metadata = f.metadata() or {"format": "pt"}
        save_file(tensors, str(out / shard.name), metadata=metadata)
    return out


def _check_base(base: Path, files: dict[str, Path], adapter: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """The adapter fits the base folder: every key there, same shape, not FP8-quantized, the same tensors it was
    trained from."""
    keys = sorted(adapter)
    for key in keys:
        if key not in files:
            raise AdapterError(f"{base} has no tensor {key}: the adapter belongs to another model (or the base "
                               "stores its experts fused; load it with dsmoe.from_pretrained, apply "
                               "dsmoe.esft.load_adapter and save_pretrained instead)")
        with safe_open(str(files[key]), "pt") as f:
            s = f.get_slice(key)
            shape, dtype = tuple(s.get_shape()), s.get_dtype()
        if shape != tuple(adapter[key].shape):
            raise AdapterError(f"{base}: {key} has shape {shape}, the adapter's {tuple(adapter[key].shape)}")
        if dtype.startswith("F8") or f"{key.removesuffix('.weight')}.weight_scale_inv" in files:
            raise AdapterError(f"{base} stores {key} in FP8 with a block scale: merge into a dequantized copy "
                               "(dsmoe.from_pretrained, dsmoe.esft.load_adapter, save_pretrained)")
    if _tensors_sha256(base, keys, files) != config["base"]["tensors_sha256"]:
        raise AdapterError(f"{base} is not the base this adapter was trained from (recorded: "
                           f"{config['base']['path']}): its tensors under the adapter's keys differ")


def _weight_files(folder: Path) -> dict[str, Path]:
    """key -> the safetensors file of a HuggingFace folder that holds it, as dsmoe.pretrained reads the folder."""
    return {key: file for key, (file, _, _) in _headers(_shards(folder)).items()}


def _tensors_sha256(folder: Path, keys: Sequence[str], files: dict[str, Path]) -> str:
    """SHA-256 of the stored bytes (dtype, shape, data) of these keys' tensors, in sorted key order."""
    h = hashlib.sha256()
    by_file: dict[Path, list[str]] = {}
    for key in sorted(keys):
        by_file.setdefault(files[key], []).append(key)
    digests = {}
    for file, file_keys in by_file.items():
        with safe_open(str(file), "pt") as f:
            for key in file_keys:
                t = f.get_tensor(key).contiguous()
                digests[key] = hashlib.sha256(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode()
                                              + t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    for key in sorted(keys):
        h.update(digests[key].encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


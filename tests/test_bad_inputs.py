"""Bad inputs, tried as a user would: every one gets a clear error naming the field, option or file
(the library: a ValueError or TypeError; the `dsmoe` command: exit 1 and one line) or a correct result, never
a traceback, a hang or a silent wrong answer. Covers MoEConfig, the layer's inputs, HF configs and weights,
TrainConfig and `--set`, the memory estimate of a training step, checkpoint tokenizers, and the CLI's options;
then property tests (hypothesis) over every MoEConfig and TrainConfig field."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dsmoe import MoE, MoEConfig, TrainConfig, checkpoint, cli, hf
from dsmoe.memory import check_step_memory, step_memory
from dsmoe.model import MoETransformer
from dsmoe.presets import apply_sets, build_configs, preset
from dsmoe.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer
from dsmoe.train import build_optimizer, lr_factor

BASE: dict[str, Any] = dict(dim=8, n_routed_experts=8, n_shared_experts=1, top_k=2, expert_dim=4)
INF, NAN = float("inf"), float("nan")


@pytest.fixture(autouse=True)
def keep_threads():
    """`dsmoe study` and `bench` set torch's thread count; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def cli_error(argv: list[str], capsys) -> str:
    """Run `dsmoe argv`: it must exit 1 with one line `dsmoe <command>: error: ...`; returns that line."""
    assert cli.main(argv) == 1
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and out.startswith(f"dsmoe {argv[0]}: error: "), out
    return out


# ----------------------------------------------------------------------------- MoEConfig

BAD_MOE = {  # changes: (field named, a word of what is allowed)
    "dim-bool": (dict(dim=True), "dim", "integer"),
    "top_k-bool": (dict(top_k=True), "top_k", "integer"),
    "experts-float": (dict(n_routed_experts=8.7), "n_routed_experts", "integer"),
    "shared-str": (dict(n_shared_experts="1"), "n_shared_experts", "integer"),
    "route_scale-inf": (dict(route_scale=INF), "route_scale", "<= 1000"),
    "route_scale-nan": (dict(route_scale=NAN), "route_scale", "<= 1000"),
    "route_scale-huge": (dict(route_scale=1e6), "route_scale", "<= 1000"),
    "route_scale-str": (dict(route_scale="2.5"), "route_scale", "number"),
    "bias_speed-inf": (dict(bias_update_speed=INF), "bias_update_speed", "finite"),
    "bias_speed-nan": (dict(bias_update_speed=NAN), "bias_update_speed", "finite"),
    "bias_speed-huge": (dict(bias_update_speed=10.0), "bias_update_speed", "[0, 1]"),
    "aux-nan": (dict(aux_loss_alpha=NAN), "aux_loss_alpha", "finite"),
    "z-inf": (dict(z_loss_beta=INF), "z_loss_beta", "finite"),
    "capacity-inf": (dict(capacity_factor=INF), "capacity_factor", "finite"),
    "capacity-str": (dict(capacity_factor="1.5"), "capacity_factor", "number"),
    "norm-str": (dict(norm_topk_prob="false"), "norm_topk_prob", "True or False"),
    "uniform-int": (dict(uniform_routing=1), "uniform_routing", "True or False"),
    "check-none": (dict(check_inputs=None), "check_inputs", "True or False"),
    "score-none": (dict(score_func=None), "score_func", "'softmax'"),
}


@pytest.mark.parametrize("changes,field,allowed", BAD_MOE.values(), ids=BAD_MOE.keys())
def test_moe_config_rejects(changes, field, allowed):
    with pytest.raises(ValueError) as info:
        MoEConfig(**{**BASE, **changes})
    assert field in str(info.value) and allowed in str(info.value)


def test_huge_capacity_factor_is_dropless():
    """capacity_factor=1e300 overflowed ceil(); above E it keeps every assignment, as dropless does."""
    torch.manual_seed(0)
    capped, dropless = MoE(MoEConfig(**BASE, capacity_factor=1e300)), MoE(MoEConfig(**BASE))
    dropless.load_state_dict(capped.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(capped(x), dropless(x))
    assert capped.dropped == 0


# ----------------------------------------------------------------------------- the layer's input

def _meta_layer() -> MoE:
    with torch.device("meta"):
        return MoE(MoEConfig(**BASE))


BAD_X = {  # (layer, input, exception, words of the message)
    "bf16-into-fp32": (lambda: MoE(MoEConfig(**BASE)), lambda: torch.randn(3, 8).bfloat16(), TypeError,
                       ["torch.bfloat16", "torch.float32", "moe.to"]),
    "fp16-into-fp32": (lambda: MoE(MoEConfig(**BASE)), lambda: torch.randn(3, 8).half(), TypeError,
                       ["torch.float16", "torch.float32"]),
    "fp64-into-fp32": (lambda: MoE(MoEConfig(**BASE)), lambda: torch.randn(3, 8).double(), TypeError,
                       ["torch.float64", "torch.float32"]),
    "fp32-into-bf16": (lambda: MoE(MoEConfig(**BASE)).bfloat16(), lambda: torch.randn(3, 8), TypeError,
                       ["torch.float32", "torch.bfloat16"]),
    "meta-input": (lambda: MoE(MoEConfig(**BASE)), lambda: torch.randn(3, 8, device="meta"), ValueError,
                   ["meta", "cpu"]),
    "meta-layer": (_meta_layer, lambda: torch.randn(3, 8, device="meta"), ValueError, ["meta device"]),
    "list": (lambda: MoE(MoEConfig(**BASE)), lambda: [[0.0] * 8], TypeError, ["torch.Tensor", "list"]),
    "1e30": (lambda: MoE(MoEConfig(**BASE)), lambda: torch.full((3, 8), 1e30), ValueError,
             ["output is not finite", "1e+30"]),
}


@pytest.mark.parametrize("layer,x,exc,words", BAD_X.values(), ids=BAD_X.keys())
def test_bad_layer_input(layer, x, exc, words):
    with pytest.raises(exc) as info:
        layer()(x())
    assert all(w in str(info.value) for w in words), str(info.value)


def test_nan_bias_is_an_error():
    """A NaN in the balancing bias sent every token to the same experts, silently."""
    moe = MoE(MoEConfig(**BASE, score_func="sigmoid"))
    moe.gate.bias[3] = NAN
    with pytest.raises(ValueError, match=r"balancing bias \(gate.bias\) is not finite"):
        moe(torch.randn(4, 8))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=["fp64", "bf16", "fp16"])
def test_a_layer_computes_in_its_own_dtype(dtype):
    """Input and layer in the same dtype work, as nn.Linear's do, and agree with fp32."""
    torch.manual_seed(0)
    ref = MoE(MoEConfig(**BASE))
    moe = MoE(MoEConfig(**BASE)).to(dtype)
    moe.load_state_dict(ref.state_dict())
    x = torch.randn(6, 8)
    y = moe(x.to(dtype))
    assert y.dtype == dtype
    tol = 1e-5 if dtype == torch.float64 else 5e-2  # the fp32 reference rounds too
    torch.testing.assert_close(y.float(), ref(x), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- HuggingFace configs and weights

HF_GOOD = dict(model_type="deepseek_v3", hidden_size=16, n_routed_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=8, n_group=4, topk_group=2, n_shared_experts=1)
BAD_HF = {
    "experts-8.7": (dict(n_routed_experts=8.7), "n_routed_experts=8.7"),
    "k-str": (dict(num_experts_per_tok="2"), "num_experts_per_tok='2'"),
    "dim-bool": (dict(hidden_size=True), "hidden_size=True"),
    "groups-float": (dict(n_group=2.5), "n_group=2.5"),
    "norm-str": (dict(norm_topk_prob="false"), "norm_topk_prob='false'"),
    "seq_aux-str": (dict(seq_aux="false", aux_loss_alpha=0.001), "seq_aux='false'"),
    "scale-str": (dict(routed_scaling_factor="2.5"), "routed_scaling_factor='2.5'"),
    "scale-inf": (dict(routed_scaling_factor=INF), "routed_scaling_factor=inf"),
    "alpha-str": (dict(aux_loss_alpha="0.001"), "aux_loss_alpha='0.001'"),
}


@pytest.mark.parametrize("changes,words", BAD_HF.values(), ids=BAD_HF.keys())
def test_hf_config_rejects(changes, words):
    with pytest.raises(ValueError) as info:
        hf.moe_config_from_hf(HF_GOOD | changes)
    assert words in str(info.value)


@pytest.mark.parametrize("d", [[HF_GOOD], "config.json", None], ids=["list", "str", "none"])
def test_hf_config_that_is_not_a_dict(d):
    with pytest.raises(TypeError, match="HF config must be a dict"):
        hf.moe_config_from_hf(d)


def test_hf_integral_floats_are_integers():
    """8.0 (some exporters write integers so) is 8; only a fractional value is refused."""
    cfg = hf.moe_config_from_hf(HF_GOOD | dict(n_routed_experts=8.0, hidden_size=16.0))
    assert cfg.n_routed_experts == 8 and cfg.dim == 16 and isinstance(cfg.dim, int)


@pytest.mark.parametrize("drop", ["experts.down_proj", "experts.gate_up_proj"], ids=["no-down", "no-gate-up"])
def test_fused_weights_with_a_part_missing(drop):
    layer = MoE(hf.moe_config_from_hf(HF_GOOD))
    sd = hf.fuse_experts(hf.hf_state_dict(layer))
    del sd[drop]
    with pytest.raises((ValueError, KeyError), match=drop):
        hf.load_hf_state_dict(layer, sd)


# ----------------------------------------------------------------------------- TrainConfig and --set

BAD_TRAIN = {
    "grad_clip-neg": (dict(grad_clip=-1.0), "grad_clip", ">= 0"),
    "grad_clip-nan": (dict(grad_clip=NAN), "grad_clip", "finite"),
    "weight_decay-neg": (dict(weight_decay=-1.0), "weight_decay", ">= 0"),
    "lr-str": (dict(lr="fast"), "lr='fast'", "number"),
    "lr-inf": (dict(lr=INF), "lr=inf", "finite"),
    "lr-zero": (dict(lr=0.0), "lr=0.0", "> 0"),
    "min_lr-above-lr": (dict(min_lr=1.0), "min_lr=1.0", "[0, lr="),
    "beta1-one": (dict(beta1=1.0), "beta1", "[0, 1)"),
    "beta2-neg": (dict(beta2=-0.1), "beta2", "[0, 1)"),
    "steps-bool": (dict(steps=True), "steps=True", "integer"),
    "steps-str": (dict(steps="10"), "steps='10'", "integer"),
    "batch-float": (dict(batch_size=2.5), "batch_size=2.5", "integer"),
    "seed-neg": (dict(seed=-1), "seed=-1", ">= 0"),
    "bpe-vocab-small": (dict(bpe_vocab_size=100), "bpe_vocab_size=100", ">= 260"),
    "tensorboard-str": (dict(tensorboard="false"), "tensorboard", "True or False"),
    "device-gpu": (dict(device="gpu"), "device='gpu'", "'cpu' or 'cuda'"),
    "device-list": (dict(device=["cpu"]), "device=['cpu']", "'cpu' or 'cuda'"),
    "data-int": (dict(data=3), "data=3", "path"),
    "topk-start-alone": (dict(topk_start=2), "topk_anneal_steps=0", "both > 0"),
    "topk-anneal-alone": (dict(topk_anneal_steps=100), "topk_start=0", "both > 0"),
}


@pytest.mark.parametrize("changes,words,allowed", BAD_TRAIN.values(), ids=BAD_TRAIN.keys())
def test_train_config_rejects(changes, words, allowed):
    with pytest.raises(ValueError) as info:
        TrainConfig(**changes)
    assert words in str(info.value) and allowed in str(info.value)


def test_train_config_keeps_a_path_as_its_string(tmp_path):
    """A pathlib.Path for data/out/resume is kept as a string, so that config.json can hold it."""
    cfg = TrainConfig(data=tmp_path, out=tmp_path / "run")
    assert cfg.data == str(tmp_path) and json.loads(json.dumps(cfg.to_dict()))["out"] == str(tmp_path / "run")


BAD_SETS = {  # --set item: words of the message
    "typo-lr": ("lerning_rate=1e-3", "did you mean 'lr'?"),
    "alias-lr": ("learning_rate=1e-3", "did you mean 'lr'?"),
    "bare-moe-field": ("top_k=4", "did you mean 'moe.top_k'?"),
    "typo-moe-field": ("moe.bias_update_sped=0.01", "unknown --set key 'moe.bias_update_sped'"),
    "int-8.7": ("steps=8.7", "--set steps: expected an integer, got '8.7'"),
    "float-word": ("lr=fast", "--set lr: expected a number, got 'fast'"),
    "lr-inf": ("lr=inf", "lr=inf is invalid"),
    "grad_clip-neg": ("grad_clip=-1", "grad_clip=-1.0 is invalid"),
    "capacity-inf": ("moe.capacity_factor=inf", "capacity_factor=inf is invalid"),
    "bool-word": ("tensorboard=maybe", "expected true or false"),
    "no-equals": ("lr", "must look like key=value"),
}


@pytest.mark.parametrize("item,words", BAD_SETS.values(), ids=BAD_SETS.keys())
def test_bad_set(item, words):
    with pytest.raises(ValueError) as info:
        build_configs("debug", [item])
    assert words in str(info.value)


def test_set_integer_in_float_notation():
    assert build_configs("debug", ["steps=1e3"])[1].steps == 1000


def test_set_suggests_nothing_for_nonsense():
    with pytest.raises(ValueError) as info:
        apply_sets(*build_configs("debug"), ["zzzzqqq=1"])
    assert "did you mean" not in str(info.value) and "allowed keys: " in str(info.value)


# ----------------------------------------------------------------------------- the memory of a training step

def test_huge_batch_is_refused_with_the_memory_it_needs():
    model_cfg, train_cfg = build_configs("tiny", ["batch_size=100000"])
    with pytest.raises(ValueError) as info:
        check_step_memory(model_cfg, train_cfg, available=24 * 2**30)
    message = str(info.value)
    assert "batch_size=100000 is too large" in message and "GiB" in message and "24.0 GiB available" in message
    fits = int(message.split("at most ")[1].split()[0])
    fixed, per_sequence = step_memory(model_cfg, train_cfg)
    assert fixed + fits * per_sequence <= 24 * 2**30 < fixed + (fits + 1) * per_sequence


def test_memory_estimate_scales_and_passes_ordinary_runs():
    model_cfg, train_cfg = build_configs("tiny")
    fixed, per_sequence = step_memory(model_cfg, train_cfg)
    assert fixed == 16 * model_cfg.num_params()
    half = step_memory(model_cfg, dataclasses.replace(train_cfg, seq_len=model_cfg.max_seq_len // 2))[1]
    assert half == pytest.approx(per_sequence / 2, rel=0.01)
    bpe = step_memory(model_cfg, dataclasses.replace(train_cfg, tokenizer="bpe", bpe_vocab_size=8192))
    assert bpe[0] > fixed and bpe[1] > per_sequence  # a larger vocabulary: a larger head and logits
    check_step_memory(model_cfg, train_cfg, available=2**30)  # the tiny preset's batch fits in 1 GiB
    check_step_memory(model_cfg, train_cfg)  # and on this machine


def test_even_one_sequence_too_many():
    model_cfg, train_cfg = build_configs("tiny")
    with pytest.raises(ValueError, match="even batch_size=1 does not fit"):
        check_step_memory(model_cfg, train_cfg, available=2**20)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "debug"])
def test_memory_estimate_against_measured_training_steps(name):
    """The activations per sequence against two CPU training steps at two batch sizes, in fresh processes: the
    rise of the allocated peak (dsmoe bench pp's measure, malloc's bytes in use after every op) per added
    sequence within 10% of the estimate; tiny's peak RSS, which glibc's kept heap inflates, within a factor of 2."""
    from dsmoe.bench import pp as bench

    if bench.allocated() is None:
        pytest.skip("the allocated memory is read from glibc (mallinfo2)")
    script = (
        "import importlib, resource, sys, torch\n"
        "from dsmoe.bench.pp import PeakAllocated, allocated\n"
        "from dsmoe.presets import build_configs\n"
        "from dsmoe.model import MoETransformer\n"
        "from dsmoe.train import build_optimizer\n"
        "torch.set_num_threads(1); torch.manual_seed(0)\n"
        "importlib.import_module('torch._dynamo')  # what the first forward imports\n"
        "model_cfg, train_cfg = build_configs(sys.argv[1], ['batch_size=' + sys.argv[2]])\n"
        "before, peak = allocated(), PeakAllocated()\n"
        "model = MoETransformer(model_cfg); opt = build_optimizer(model, train_cfg)\n"
        "x = torch.randint(0, model_cfg.vocab_size, (train_cfg.batch_size, model_cfg.max_seq_len))\n"
        "with peak:\n"
        "    for _ in range(2):\n"
        "        _, loss = model(x, x); (loss + model.aux_loss()).backward(); del _, loss\n"
        "        opt.step(); opt.zero_grad()\n"
        "print(peak.peak - before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    small, large = 4, 20
    env = {**os.environ, "MKL_DISABLE_FAST_MM": "1"}  # MKL's cache of freed buffers is not the step's
    runs = [[int(v) for v in subprocess.run([sys.executable, "-c", script, name, str(b)], capture_output=True,
                                            text=True, check=True, env=env).stdout.split()] for b in (small, large)]
    allocated, rss = ((runs[1][i] - runs[0][i]) / (large - small) for i in (0, 1))
    estimated = step_memory(*build_configs(name))[1]
    assert 0.9 < estimated / allocated < 1.1, (estimated, allocated)
    if name == "tiny":  # debug's whole step stays under the RSS the process reached importing torch
        assert 0.5 < estimated / rss < 2, (estimated, rss)


# ----------------------------------------------------------------------------- checkpoint tokenizers

TEXTS = [f"def f{i}(x):\n    return x * {i} + 'the quick brown fox'\n" * 5 for i in range(50)]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TEXTS, vocab_size=300)


def make_checkpoint(directory: Path, tokenizer) -> Path:
    """A debug-sized model saved with `tokenizer`, as `dsmoe train` saves one."""
    model_cfg = dataclasses.replace(preset("debug"), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    config = {"model": model_cfg.to_dict(), "train": TrainConfig(preset="debug", tokenizer=tokenizer.kind).to_dict(),
              "step": 0}
    return checkpoint.save(directory, MoETransformer(model_cfg), config, {}, tokenizer)


def _break(ckpt: Path, how: str) -> None:
    if how == "no-tokenizer.json":
        (ckpt / "tokenizer.json").unlink()
    elif how == "no-tokenizer-files":
        (ckpt / "tokenizer.json").unlink()
        (ckpt / "bpe.json").unlink()
    elif how == "corrupt-tokenizer.json":
        (ckpt / "tokenizer.json").write_text("")
    elif how == "tokenizer.json-no-kind":
        (ckpt / "tokenizer.json").write_text("[]")
    elif how == "larger-bpe":  # another model's tokenizer, with ids the model has no embedding for
        BPETokenizer.train(TEXTS, vocab_size=400).save(ckpt)
    elif how == "no-bpe.json":
        (ckpt / "bpe.json").unlink()
    elif how == "corrupt-bpe.json":
        (ckpt / "bpe.json").write_text('{"version": "1.0", "model": ')


BROKEN = {  # how: (exception, words of the message)
    "no-tokenizer.json": (FileNotFoundError, ["tokenizer.json is missing", "bpe.json is there"]),
    "no-tokenizer-files": (FileNotFoundError, ["tokenizer.json is missing", "vocab_size=300", "byte tokenizer's 260"]),
    "corrupt-tokenizer.json": (ValueError, ["tokenizer.json is corrupt"]),
    "tokenizer.json-no-kind": (ValueError, ["tokenizer.json is corrupt"]),
    "larger-bpe": (ValueError, ["tokens, more than the model's vocab_size=300", "another model"]),
    "no-bpe.json": (FileNotFoundError, ["bpe.json is missing"]),
    "corrupt-bpe.json": (ValueError, ["bpe.json is not a valid BPE tokenizer file"]),
}


@pytest.mark.parametrize("how", BROKEN, ids=BROKEN)
def test_broken_bpe_checkpoint(how, bpe, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "checkpoint", bpe)
    assert load_tokenizer(ckpt).kind == "bpe"  # intact, it loads
    _break(ckpt, how)
    exc, words = BROKEN[how]
    with pytest.raises(exc) as info:
        load_tokenizer(ckpt)
    assert all(w in str(info.value) for w in words), str(info.value)
    for argv in (["generate", "--checkpoint", str(tmp_path), "--max-tokens", "2"],
                 ["eval", "--checkpoint", str(tmp_path)]):
        out = cli_error(argv, capsys)
        assert all(w in out for w in words)


def test_byte_checkpoint_without_tokenizer_json_still_loads(tmp_path):
    """Checkpoints from before tokenizer.json was written used bytes: those load as before."""
    ckpt = make_checkpoint(tmp_path / "checkpoint", ByteTokenizer())
    (ckpt / "tokenizer.json").unlink()
    assert load_tokenizer(ckpt).kind == "byte"
    assert checkpoint.load_checkpoint(tmp_path)[3].kind == "byte"


def test_resume_config_with_a_string_for_a_number(tmp_path, capsys):
    """config.json holding lr: "fast" failed with "'>' not supported between 'str' and 'int'"."""
    ckpt = make_checkpoint(tmp_path / "checkpoint", ByteTokenizer())
    config = json.loads((ckpt / "config.json").read_text())
    config["train"]["lr"] = "fast"
    (ckpt / "config.json").write_text(json.dumps(config))
    out = cli_error(["train", "--resume", str(tmp_path), "--quiet"], capsys)
    assert "config.json is not a valid config" in out and "lr='fast'" in out


# ----------------------------------------------------------------------------- the dsmoe command's options

BAD_ARGV = {  # argv: words of the one-line message
    "generate-top-k": (["generate", "--checkpoint", "unused", "--top-k", "-5"], "--top-k -5 is invalid"),
    "generate-top-k-0": (["generate", "--checkpoint", "unused", "--top-k", "0"], "--top-k 0 is invalid"),
    "generate-max-tokens": (["generate", "--checkpoint", "unused", "--max-tokens", "0"], "--max-tokens 0"),
    "generate-temperature-nan": (["generate", "--checkpoint", "unused", "--temperature", "nan"],
                                 "--temperature nan"),
    "generate-temperature-neg": (["generate", "--checkpoint", "unused", "--temperature", "-1"], "--temperature -1"),
    "generate-top-p": (["generate", "--checkpoint", "unused", "--top-p", "0"], "--top-p 0.0"),
    "generate-seed": (["generate", "--checkpoint", "unused", "--seed", "-3"], "--seed -3"),
    "eval-batches": (["eval", "--checkpoint", "unused", "--batches", "0"], "--batches 0"),
    "demo-max-tokens": (["demo", "--max-tokens", "0"], "--max-tokens 0"),
    "train-typo": (["train", "--preset", "debug", "--set", "lerning_rate=1"], "did you mean 'lr'?"),
    "train-grad-clip": (["train", "--preset", "debug", "--set", "grad_clip=-1"], "grad_clip=-1.0 is invalid"),
    "train-weight-decay": (["train", "--preset", "debug", "--set", "weight_decay=-1"], "weight_decay=-1.0"),
    "train-huge-batch": (["train", "--preset", "tiny", "--set", "batch_size=100000"],
                         "batch_size=100000 is too large for this machine"),
    "train-bias-speed-inf": (["train", "--preset", "debug", "--set", "moe.bias_update_speed=inf"],
                             "bias_update_speed=inf"),
    "train-steps-neg": (["train", "--preset", "debug", "--steps", "-1"], "steps=-1 is invalid"),
    "train-expert-parallel-neg": (["train", "--preset", "debug", "--expert-parallel", "-2"], "expert_parallel=-2"),
    "study-huge-batch": (["study", "balance", "--set", "batch_size=100000"], "batch_size=100000 is too large"),
    "bench-layer-tokens": (["bench", "layer", "--tokens", "0"], "--tokens 0"),
    "bench-layer-repeats": (["bench", "layer", "--repeats", "0"], "--repeats 0"),
    "bench-layer-threads": (["bench", "layer", "--threads", "-1"], "--threads -1"),
    "bench-layer-warmup": (["bench", "layer", "--warmup", "-1"], "--warmup -1"),
    "bench-layer-dim": (["bench", "layer", "--dim", "0"], "dim=0 is invalid"),
    "bench-layer-top-k": (["bench", "layer", "--top-k", "65"], "top_k=65 is invalid"),
    "bench-train-chunk": (["bench", "train", "--chunk", "0"], "--chunk 0"),
    "bench-train-batch": (["bench", "train", "--batch-size", "0"], "--batch-size 0"),
    "bench-train-huge-batch": (["bench", "train", "--batch-size", "100000"], "batch_size=100000 is too large"),
    "bench-ep-tokens": (["bench", "ep", "--tokens", "0"], "--tokens 0"),
    "report-no-run": (["report", "--run", "/nonexistent/run"], "no metrics file"),
}


@pytest.mark.parametrize("argv,words", BAD_ARGV.values(), ids=BAD_ARGV.keys())
def test_bad_command_line(argv, words, capsys):
    assert words in cli_error(argv, capsys)


@pytest.mark.parametrize("argv", [["bench", "layer"], ["bench", "train"], ["study"]], ids=" ".join)
def test_help_has_a_description_and_defaults(argv, capsys):
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    out = capsys.readouterr().out
    usage, description = out.split("\n\n")[:2]
    assert len(description.split()) >= 5, out  # a sentence, not just the usage line
    assert "(default: " in out and "{'" not in out and "': " not in out  # defaults shown, no raw dict


# ----------------------------------------------------------------------------- properties over every field

ODD = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.just([1]),
                st.floats(allow_nan=True, allow_infinity=True))
SIZE = st.one_of(st.integers(-2, 8), ODD)  # sizes stay small: a valid config is built and run
NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), ODD)
MOE_FIELDS = {
    **{name: SIZE for name in ("dim", "n_routed_experts", "n_shared_experts", "top_k", "expert_dim", "n_groups",
                               "topk_groups")},
    "score_func": st.one_of(st.sampled_from(["softmax", "sigmoid"]), ODD),
    "group_score": st.one_of(st.sampled_from(["max", "top2"]), ODD),
    "bias_update_rule": st.one_of(st.sampled_from(["sign", "proportional"]), ODD),
    **{name: NUMBER for name in ("route_scale", "bias_update_speed", "aux_loss_alpha", "seq_aux_loss_alpha",
                                 "device_loss_alpha", "comm_loss_alpha", "z_loss_beta", "capacity_factor")},
    **{name: st.one_of(st.booleans(), ODD) for name in ("norm_topk_prob", "uniform_routing", "check_inputs")},
}


@settings(max_examples=100, deadline=None)
@given(changes=st.fixed_dictionaries({}, optional=MOE_FIELDS), seed=st.integers(0, 2**31 - 1))
@example(changes={"route_scale": 2, "bias_update_speed": 0, "capacity_factor": 1, "z_loss_beta": 0}, seed=0)
@example(changes={"route_scale": True, "norm_topk_prob": 1}, seed=0)
def test_any_moe_config_works_or_names_the_field(changes, seed):
    """Any value of any field: a layer that runs (a training forward, a bias update, a forward again) with a
    finite output, or a ValueError that names a field that was set."""
    try:
        cfg = MoEConfig(**{**BASE, **changes})
    except ValueError as e:
        assert any(name in str(e) for name in changes), (changes, str(e))
        return
    torch.manual_seed(seed)
    moe = MoE(cfg)
    x = torch.randn(2, 3, cfg.dim)
    y = moe(x)
    moe.update_bias()
    moe.eval()
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(moe(x)).all()
    assert torch.isfinite(moe.gate.bias).all()


TRAIN_INTS = ("steps", "batch_size", "seq_len", "grad_accum", "warmup_steps", "eval_every", "eval_batches",
              "save_every", "log_every", "seed", "bpe_vocab_size", "topk_start", "topk_anneal_steps", "expert_parallel")
TRAIN_FIELDS = {
    **{name: st.one_of(st.integers(-2, 10**4), st.integers(), ODD) for name in TRAIN_INTS},
    **{name: NUMBER for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip")},
    **{name: st.one_of(st.sampled_from(["cpu", "cuda", "byte", "bpe"]), ODD) for name in ("device", "tokenizer")},
    **{name: st.one_of(st.text(max_size=5), ODD) for name in ("preset", "data", "out", "resume", "init")},
    "tensorboard": st.one_of(st.booleans(), ODD),
}


@settings(max_examples=100, deadline=None)
@given(changes=st.fixed_dictionaries({}, optional=TRAIN_FIELDS))
@example(changes={"beta1": 0})  # found by hypothesis: an int beta passed validation, then AdamW refused it
@example(changes={"beta1": 0, "beta2": 0, "lr": 1, "min_lr": 0, "weight_decay": 0, "grad_clip": 1,
                  "dist_timeout_s": 60})
@example(changes={"beta1": True})
def test_any_train_config_works_or_names_the_field(changes):
    """Any value of any field: a config whose schedule, optimizer and config.json round trip work, or a
    ValueError that names a field that was set."""
    try:
        cfg = TrainConfig(**changes)
    except ValueError as e:
        assert any(name in str(e) for name in changes), (changes, str(e))
        return
    assert TrainConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    for step in (0, cfg.warmup_steps, cfg.steps - 1, cfg.steps):
        factor = lr_factor(step, cfg)
        assert math.isfinite(factor) and 0 <= factor <= 1 + 1e-12
    build_optimizer(torch.nn.Linear(2, 2), cfg)

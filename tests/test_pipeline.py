"""Pipeline parallelism (dsmoe.parallel.pipeline): the stage split, and training on torch.distributed.pipelining
equal to one process: pp 2, pp 2 x ep 2 and pp 2 x dp 2 (gloo, CPU) give the single-process losses, validation
losses and balancing biases, with an auxiliary loss on every stage; the pipelined checkpoint reads in one
process. Bad layouts are refused before any process group."""

import os

import pytest
import torch

from dsmoe.config import ModelConfig, MoEConfig
from dsmoe.parallel.pipeline import check_layout, describe_split, split_layers
from test_parallel import TRAIN_SETS, _train_rows, launch, resume_worker


def _cfg(n_layers=6, **kw) -> ModelConfig:
    moe = MoEConfig(dim=32, n_routed_experts=8, top_k=2, expert_dim=16, n_shared_experts=1)
    return ModelConfig(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=4, moe=moe, **kw)


def test_stages_are_contiguous_balanced_and_cover_every_block():
    cfg = _cfg(6, vocab_size=64)
    for stages in range(1, 7):
        split = split_layers(cfg, stages)
        assert [i for s in split for i in s] == list(range(6)) and all(split)
    assert split_layers(cfg, 2) == [[0, 1, 2], [3, 4, 5]]  # the dense first block evens out the embedding
    big_vocab = _cfg(6, vocab_size=50_000)  # an embedding worth several blocks: the first stage takes fewer
    assert len(split_layers(big_vocab, 2)[0]) < 3
    assert describe_split([[0, 1], [2], [3, 4, 5]]) == "0-1 | 2 | 3-5"
    with pytest.raises(ValueError, match=r"7 pipeline stages need at least one block each: the model has "
                                         r"n_layers=6"):
        split_layers(cfg, 7)


@pytest.mark.parametrize("args,match", [
    ((4, 2, 1, "bfs", 0, 8), r"--schedule bfs is not available; choose one of gpipe, 1f1b, interleaved, zb, "
                            r"dualpipev"),
    ((2, 2, 1, "dualpipev", 2, 8), r"--microbatches 2 is fewer than the 4 stages: DualPipeV needs"),
    ((8, 4, 1, "interleaved", 9, 18), r"--microbatches 9 must be a multiple of its rounds \(2 = M // pp\)"),
    ((4, 3, 1, "1f1b", 0, 8), r"--pipeline-parallel 3 x --expert-parallel 1 must divide the 4 processes"),
    ((4, 2, 2, "1f1b", 1, 8), r"--microbatches 1 is fewer than the 2 pipeline ranks: 1f1b needs"),
    ((4, 2, 1, "gpipe", 3, 8), r"batch_size=8 must split over the 2 data ranks .* into 3 equal micro-batches"),
    ((4, 2, 2, "zb", 2, 8), r"--schedule zb runs on --pipeline-parallel alone .* not on the 2 data ranks"),
    ((4, 2, 1, "dualpipev", 4, 8), r"--schedule dualpipev runs on --pipeline-parallel alone"),
])
def test_bad_layouts_are_refused_before_any_process_group(args, match):
    with pytest.raises(ValueError, match=match):
        check_layout(*args)
    assert check_layout(4, 2, 1, "gpipe", 1, 8) == 2


def test_one_process_cannot_pipeline(monkeypatch):
    from dsmoe.parallel.context import init_context

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"--pipeline-parallel 2 needs one process per stage: launch with "
                                         r"`torchrun --nproc_per_node 2"):
        init_context(0, 8, pipeline_parallel=2)


def pp_worker(rank, world):
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    sets = TRAIN_SETS + [f"out={os.environ['DSMOE_RUN']}", *os.environ["DSMOE_SETS"].split()]
    train(*build_configs("debug", sets), progress=False)
    return {}


MODEL = ["n_layers=4", "moe.seq_aux_loss_alpha=0.01", "steps=4"]  # a MoE block and an aux loss on every stage


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2-1f1b", "pp2-gpipe-m4", "pp2-interleaved", "pp2-zb", "pp2-zb-ac",
                                    "pp2-dualpipev", "pp2xep2", "pp2xdp2", "pp2xdp2-interleaved"])
def test_pipelined_training_equals_single_process(layout, tmp_path, monkeypatch):
    from dsmoe.checkpoint import load_checkpoint
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    train(*build_configs("debug", TRAIN_SETS + MODEL + [f"out={tmp_path / 'single'}"]), progress=False)
    world, sets = {"pp2-1f1b": (2, ["schedule=1f1b"]), "pp2-gpipe-m4": (2, ["schedule=gpipe", "microbatches=4"]),
                   "pp2-interleaved": (2, ["schedule=interleaved", "microbatches=4"]),
                   "pp2-zb": (2, ["schedule=zb", "microbatches=4"]),
                   "pp2-zb-ac": (2, ["schedule=zb", "microbatches=4", "activation_checkpointing=true"]),
                   "pp2-dualpipev": (2, ["schedule=dualpipev", "microbatches=4"]),
                   "pp2xdp2-interleaved": (4, ["schedule=interleaved", "microbatches=2"]),
                   "pp2xep2": (4, ["expert_parallel=2"]), "pp2xdp2": (4, [])}[layout]
    monkeypatch.setenv("DSMOE_RUN", str(tmp_path / "pp"))
    monkeypatch.setenv("DSMOE_SETS", " ".join(MODEL + ["pipeline_parallel=2", *sets]))
    assert launch(pp_worker, world, tmp_path / "results") == [{}] * world, "a rank crashed"
    single_loss, single_val = _train_rows(tmp_path / "single")
    pp_loss, pp_val = _train_rows(tmp_path / "pp")
    assert len(pp_loss) == len(single_loss) == 4
    torch.testing.assert_close(torch.tensor(pp_loss), torch.tensor(single_loss), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(pp_val), torch.tensor(single_val), atol=1e-4, rtol=0)
    single, pipelined = load_checkpoint(tmp_path / "single")[0], load_checkpoint(tmp_path / "pp")[0]
    for a, b in zip(single.moe_layers(), pipelined.moe_layers(), strict=True):
        torch.testing.assert_close(b.gate.bias, a.gate.bias, atol=0, rtol=0)
    assert any(layer.gate.bias.abs().sum() > 0 for layer in pipelined.moe_layers())
    for (name, a), b in zip(single.state_dict().items(), pipelined.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_a_pipelined_checkpoint_resumes_in_one_process_and_at_dp2(tmp_path, monkeypatch, capsys):
    """pp 2 x ep 2 stopped at step 3 resumes in one process (the command line takes the launch's layout and says
    so) and at dp 2 (--set pipeline_parallel=0): step 4's loss is the uninterrupted single-process run's."""
    import shutil

    from dsmoe import cli
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    train(*build_configs("debug", TRAIN_SETS + MODEL + [f"out={tmp_path / 'full'}"]), progress=False)
    full = _train_rows(tmp_path / "full")[0]
    monkeypatch.setenv("DSMOE_RUN", str(tmp_path / "pp"))
    monkeypatch.setenv("DSMOE_SETS", " ".join(MODEL + ["pipeline_parallel=2", "expert_parallel=2"]))
    monkeypatch.setenv("DSMOE_CUT", "1")
    assert launch(resume_worker, 4, tmp_path / "cut") == [{"interrupted": True}] * 4
    monkeypatch.delenv("DSMOE_CUT")
    shutil.copytree(tmp_path / "pp", tmp_path / "at1")
    assert cli.main(["train", "--resume", str(tmp_path / "at1"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pipeline_parallel=0 instead of the checkpoint's 2" in out
    torch.testing.assert_close(torch.tensor(_train_rows(tmp_path / "at1")[0]), torch.tensor(full), atol=1e-4, rtol=0)
    monkeypatch.setenv("DSMOE_SETS", " ".join(MODEL + ["pipeline_parallel=0", "expert_parallel=0"]))
    assert launch(resume_worker, 2, tmp_path / "dp2") == [{}, {}]
    torch.testing.assert_close(torch.tensor(_train_rows(tmp_path / "pp")[0]), torch.tensor(full), atol=1e-4, rtol=0)


def pp_fault_worker(rank, world):
    """pp 2: rank 1 (the last stage) dies or hangs inside its stage forward in step 3, mid-schedule."""
    from dsmoe.data import Corpus
    from dsmoe.parallel import pipeline
    from test_parallel import FAULT_TIMEOUT_S, strike, train_through_fault

    real_sample, real_forward, fault = Corpus.sample, pipeline._stage_forward, {"at": 0.0, "armed": False}

    def sample(self, *args, **kwargs):
        fault["armed"] = fault["armed"] or self.__dict__.setdefault("_calls", 0) >= 2
        self._calls += 1
        return real_sample(self, *args, **kwargs)

    def forward(self, *args, **kwargs):
        if fault["armed"] and not fault["at"]:
            strike(rank, fault)
        return real_forward(self, *args, **kwargs)

    Corpus.sample, pipeline._stage_forward = sample, forward
    return train_through_fault(TRAIN_SETS + [f"out={os.environ['DSMOE_RUN']}", *MODEL, "pipeline_parallel=2",
                                             "steps=6", f"dist_timeout_s={FAULT_TIMEOUT_S}"],  # the pipeline's own
                               fault)                                                  # groups take the run's timeout


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hang", "die"])
def test_a_rank_lost_mid_schedule_stops_the_other_naming_the_checkpoint(mode, tmp_path, monkeypatch):
    from dsmoe.checkpoint import load_checkpoint, read_config
    from test_parallel import FAULT_TIMEOUT_S

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DSMOE_RUN", str(tmp_path / "run"))
    monkeypatch.setenv("DSMOE_FAULT", mode)
    first = launch(pp_fault_worker, 2, tmp_path / "results", timeout_s=FAULT_TIMEOUT_S)[0]
    assert first is not None and first["error"], first
    assert "a collective failed" in first["error"] and "step 2" in first["error"], first
    assert first["seconds"] < 4 * FAULT_TIMEOUT_S + 10, first
    assert read_config(tmp_path / "run")["step"] == 2
    load_checkpoint(tmp_path / "run")


def test_a_layout_that_does_not_fit_is_refused_with_its_busiest_stage():
    """The start-of-run check under pipeline parallelism is the planner's per-stage figure (dsmoe.memory.layout_plan):
    a layout whose busiest rank needs more than the device has is refused naming it; one that fits passes."""
    from dsmoe.config import TrainConfig
    from dsmoe.memory import check_layout_memory, layout_plan

    model_cfg, train_cfg = _cfg(4, vocab_size=64), TrainConfig(batch_size=8, schedule="1f1b", pipeline_parallel=2)
    need = layout_plan(model_cfg, train_cfg, 2, 2, 1, "1f1b", 2).memory.total
    check_layout_memory(model_cfg, train_cfg, need, pp=2, dp=2, ep=1)
    with pytest.raises(ValueError, match=r"pp 2 x dp 2 x ep 1 does not fit: its busiest rank \(pipeline rank \d, "
                                         r"blocks \(2, 2\)\) needs about .* see `dsmoe plan`"):
        check_layout_memory(model_cfg, train_cfg, need - 1, pp=2, dp=2, ep=1)


@pytest.mark.slow
def test_fine_tuning_data_weights_micro_batches_by_their_trained_targets(tmp_path, monkeypatch):
    """Prompt/completion records leave pipeline micro-batches with different numbers of trained targets: pp 2 (1F1B,
    4 micro-batches) weights each by its count, so the losses are the single-process run's (the mean over every
    trained target of the batch)."""
    import json

    from dsmoe import prepare
    from dsmoe.presets import build_configs
    from dsmoe.tokenizer import ByteTokenizer
    from dsmoe.train import train

    records = [{"prompt": f"question {i} " * (1 + i % 5), "completion": f"answer {i}." * (1 + i % 3)}
               for i in range(80)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = prepare.prepare([str(tmp_path / "sft.jsonl")], tmp_path / "p", ByteTokenizer(), progress=False).out
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    sets = [*MODEL, f"data={data}", "batch_size=8", "doc_mask=true"]
    train(*build_configs("debug", TRAIN_SETS + sets + [f"out={tmp_path / 'single'}"]), progress=False)
    monkeypatch.setenv("DSMOE_RUN", str(tmp_path / "pp"))
    monkeypatch.setenv("DSMOE_SETS", " ".join([*sets, "pipeline_parallel=2", "microbatches=4"]))
    assert launch(pp_worker, 2, tmp_path / "results") == [{}, {}]
    single_loss, single_val = _train_rows(tmp_path / "single")
    pp_loss, pp_val = _train_rows(tmp_path / "pp")
    torch.testing.assert_close(torch.tensor(pp_loss), torch.tensor(single_loss), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(pp_val), torch.tensor(single_val), atol=1e-4, rtol=0)

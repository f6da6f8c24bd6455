"""torch.compile: the routed experts are one registered custom op (dsmoe::routed_swiglu, with a fake
implementation and its own backward op), which torch.library's opcheck accepts; the layer and the whole
model compile with no graph break (fullgraph) and no recompile across steps whose routing changes, and the
compiled outputs and gradients equal eager ones. The aot_eager backend traces exactly what inductor would
receive, without spending the test's time on C++ code generation."""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from dsmoe.config import ModelConfig, MoEConfig
from dsmoe.experts import GroupedExperts
from dsmoe.model import MoETransformer
from dsmoe.moe import MoE
from dsmoe.ops.routed_swiglu import routed_swiglu_op

CFG = MoEConfig(dim=16, n_routed_experts=8, n_shared_experts=1, top_k=2, expert_dim=8, score_func="sigmoid",
                norm_topk_prob=True, check_inputs=False)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kernel", [-1, 0, 1], ids=["auto", "chunked", "grouped"])
def test_opcheck(kernel):
    if kernel == 1 and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    experts = GroupedExperts(4, 16, 8)
    g = torch.Generator().manual_seed(0)
    ids_A = torch.tensor([0, 0, 1, 3, 3, 3])  # expert 2 idle
    args = (torch.randn(5, 16, generator=g, requires_grad=True), experts.w_gate, experts.w_up, experts.w_down,
            torch.rand(6, generator=g, requires_grad=True), torch.tensor([0, 2, 1, 4, 3, 0]),
            torch.bincount(ids_A, minlength=4), kernel)
    torch.library.opcheck(routed_swiglu_op, args)


def _step(module, x):
    y = module(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()  # a contiguous upstream gradient
    return y.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize("cfg", [CFG, MoEConfig(dim=16, n_routed_experts=8, top_k=2, expert_dim=8)],
                         ids=["no-checks", "default"])
def test_layer_compiles_once_without_graph_breaks(cfg):
    """Also a layer as users build it (check_inputs on, the default): its value checks are asserts inside the
    graph, which still refuse a NaN input with the eager message."""
    torch.manual_seed(0)
    eager = MoE(cfg)
    compiled_layer = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_layer, backend=counter, fullgraph=True)
    for step in range(5):  # a new input every step: new routing counts, same shapes
        x = torch.randn(24, 16, generator=torch.Generator().manual_seed(step))
        eager.zero_grad(), compiled_layer.zero_grad()
        y_ref, grads_ref = _step(eager, x)
        y, grads = _step(compiled, x)
        torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    if cfg.check_inputs:
        x[3, 5] = float("nan")
        with pytest.raises(RuntimeError, match="router logits are not finite"):
            compiled(x)
    assert counter.frame_count == 1, "recompiled across steps"


def test_model_training_steps_compile_once():
    moe = CFG.replace(dim=32, bias_update_speed=1e-3)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16, moe=moe,
                      kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(model, backend=counter, fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(5):
        data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(step))
        _, loss = forward(data[:, :-1], data[:, 1:])
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
        model.update_biases()  # the routing changes every step
    assert counter.frame_count == 1, "recompiled across steps"
    assert any(layer.gate.bias.abs().sum() > 0 for layer in model.moe_layers())


@pytest.mark.slow
def test_train_compile_gives_the_eager_losses(tmp_path, monkeypatch):
    """`dsmoe train --compile` (here the aot_eager backend, the same graphs) trains the same as eager."""
    import json

    from dsmoe.presets import build_configs
    from dsmoe.train import train

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    sets = ["seq_len=16", "batch_size=4", "eval_batches=1", "eval_every=0", "save_every=0", "log_every=1",
            "warmup_steps=2", "tensorboard=false", "steps=4"]
    rows = {}
    for name, backend in (("eager", ""), ("compiled", "aot_eager")):
        train(*build_configs("debug", sets + [f"out={tmp_path / name}", f"compile={backend}"]), progress=False)
        rows[name] = [r["loss"] for r in map(json.loads, open(tmp_path / name / "metrics.jsonl"))
                      if r["kind"] == "train"]
    torch.testing.assert_close(torch.tensor(rows["compiled"]), torch.tensor(rows["eager"]), atol=1e-5, rtol=0)

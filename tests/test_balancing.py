"""Load balancing (dsmoe.balancing): loss-free bias convergence for both update rules, the bias update by
hand, the expert-level auxiliary loss (value under uniform routing and the direction of its gradient), P_i
from normalized or raw scores (by hand in a layer, the gradient's sign, softmax unaffected), the
sequence-wise loss counting the top-K or the routed experts, the device-level and communication losses,
and the router z-loss by hand."""

import math

import pytest
import torch

from dsmoe import MoE, MoEConfig
from dsmoe import balancing as B


def round_robin_ids(T: int, K: int, E: int) -> torch.Tensor:
    return torch.arange(T * K).view(T, K) % E


# --------------------------------------------------------------------------- loss-free balancing

@pytest.mark.parametrize("score,rule,speed", [("sigmoid", "sign", 5e-3), ("softmax", "proportional", 1e-2)],
                         ids=["sigmoid-sign", "softmax-proportional"])
def test_loss_free_bias_balances_a_skewed_router(score, rule, speed):
    """Wang et al. 2024: the bias alone, updated once per step, brings MaxVio from far above 1 to near 0."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=8, n_routed_experts=8, top_k=2, expert_dim=4, n_shared_experts=0, score_func=score,
                    bias_update_speed=speed, bias_update_rule=rule, check_inputs=False)
    moe = MoE(cfg)
    x = torch.randn(512, 8) + 1  # inputs share a common direction ...
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.3)
        moe.gate.weight[:2] += 0.2  # ... that experts 0 and 1 are aligned with
    vio = []
    for _ in range(120):
        moe(x)  # training mode, grad enabled: counts are collected
        vio.append(float(moe.maxvio))
        moe.update_bias()
    assert vio[0] > 1.5
    assert max(vio[-10:]) < 0.2
    assert moe.gate.bias[:2].mean() < moe.gate.bias[2:].mean()  # the overloaded experts were pushed down


def test_update_bias_rules_by_hand():
    counts = torch.tensor([6, 2, 0, 4])  # mean 3, error [-3, 1, 3, -1]
    bias = torch.zeros(4)
    B.update_bias(bias, counts, 1e-3, "sign")
    torch.testing.assert_close(bias, torch.tensor([-1e-3, 1e-3, 1e-3, -1e-3]))
    bias = torch.zeros(4)
    B.update_bias(bias, counts, 1e-3, "proportional")
    torch.testing.assert_close(bias, 1e-3 * torch.tensor([-1.0, 1 / 3, 1.0, -1 / 3]))
    bias = torch.zeros(4)
    B.update_bias(bias, torch.zeros(4, dtype=torch.long), 1e-3, "proportional")  # no tokens: no move, no NaN
    assert torch.equal(bias, torch.zeros(4))


def test_fp32_bias_keeps_small_steps():
    """bf16 would swallow a 1e-3 step on a bias near 1; the fp32 buffer must not."""
    bias = torch.ones(2)
    for _ in range(10):
        B.update_bias(bias, torch.tensor([1, 3]), 1e-3, "sign")
    torch.testing.assert_close(bias, torch.tensor([1.01, 0.99]))


# --------------------------------------------------------------------------- expert-level auxiliary loss

@pytest.mark.parametrize("E,K", [(4, 1), (8, 2), (16, 6)])
def test_expert_loss_is_one_under_uniform_routing(E, K):
    """f_i = 1 and P_i = 1/E (equal softmax logits, round-robin choice): sum f_i P_i = 1, so L = alpha."""
    T = E * 3
    scores = torch.zeros(T, E).softmax(-1)
    ids = round_robin_ids(T, K, E)
    torch.testing.assert_close(B.expert_balance_loss(scores, ids), torch.tensor(1.0))
    torch.testing.assert_close(B._expert_fraction(ids, E), torch.ones(E))


def test_expert_loss_by_hand():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    ids = torch.tensor([[0], [0]])  # both tokens on expert 0: f = [3, 0, 0]
    torch.testing.assert_close(B.expert_balance_loss(scores, ids), torch.tensor(3 * 0.6))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_loss_gradient_lowers_the_most_loaded_expert(score):
    """One SGD step on the gate weight, driven only by the expert-level loss, lowers the mean score of the
    expert that takes the most tokens (the gradient flows through P; f is a constant count)."""
    torch.manual_seed(0)
    E, K, D, T = 8, 2, 8, 256
    x = torch.randn(T, D) + 1
    w = (torch.randn(E, D) * 0.3)
    w[0] += 0.3  # expert 0 overloaded
    w.requires_grad_(True)

    def scores_of(w):
        logits = x @ w.T
        return logits.softmax(-1) if score == "softmax" else logits.sigmoid()

    s = scores_of(w)
    ids = s.detach().topk(K, dim=-1).indices
    top = int(torch.bincount(ids.reshape(-1), minlength=E).argmax())
    B.expert_balance_loss(s, ids).backward()
    with torch.no_grad():
        before = s[:, top].mean()
        after = scores_of(w - 1.0 * w.grad)[:, top].mean()
    assert top == 0 and after < before


# --------------------------------------------------------------------------- which scores P_i averages

def identity_gate_layer(E: int, **kw) -> MoE:
    """A layer whose router logits are its input (gate weight = I): scores can be set by hand."""
    cfg = MoEConfig(dim=E, n_routed_experts=E, expert_dim=2, n_shared_experts=0, **kw)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(E))
    return moe


# Two tokens, 4 sigmoid experts on 2 devices {0,1} {2,3}, K=2, M=2; each row of scores sums to 2.
#   s = [[0.8, 0.6, 0.4, 0.2], [0.6, 0.2, 0.8, 0.4]]: token 0 takes {0, 1}, token 1 takes {2, 0}
#   f = count * E / (K*T) = [2, 1, 1, 0]; devices reached: token 0 {d0}, token 1 {d0, d1}
#   raw P = mean s = [0.7, 0.4, 0.6, 0.3]; normalized P = mean s / 2 = [0.35, 0.2, 0.3, 0.15]
#   aux  = sum f_i P_i:                                  raw 2*0.7 + 0.4 + 0.6 = 2.4      normalized 1.2
#   device: f' = [1.5, 0.5], P' = [1.1, 0.9] (raw):      1.5*1.1 + 0.5*0.9 = 2.1          normalized 1.05
#   comm: f'' = [2, 1] * G / (M*T) = [1, 0.5]:           1*1.1 + 0.5*0.9 = 1.55           normalized 0.775
BY_HAND = {"normalized": dict(aux=1.2, device=1.05, comm=0.775), "raw": dict(aux=2.4, device=2.1, comm=1.55)}


@pytest.mark.parametrize("how,expected", BY_HAND.items(), ids=BY_HAND.keys())
def test_aux_device_comm_losses_by_hand_in_a_layer(how, expected):
    s = torch.tensor([[0.8, 0.6, 0.4, 0.2], [0.6, 0.2, 0.8, 0.4]])
    moe = identity_gate_layer(4, top_k=2, score_func="sigmoid", n_groups=2, topk_groups=2, group_score="top2",
                              aux_loss_alpha=1.0, device_loss_alpha=1.0, comm_loss_alpha=1.0, aux_loss_scores=how)
    moe(torch.logit(s))
    assert moe.tokens_per_expert.tolist() == [2, 1, 1, 0]
    for name, value in expected.items():
        torch.testing.assert_close(moe.losses[name], torch.tensor(value), msg=name)


def test_softmax_losses_equal_for_both_score_choices():
    """Softmax scores sum to 1 per token: normalizing them again changes nothing (losses and gradients)."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    out = {}
    for how in ("normalized", "raw"):
        torch.manual_seed(1)
        moe = MoE(MoEConfig(dim=8, n_routed_experts=8, top_k=2, expert_dim=4, n_groups=2, topk_groups=2,
                            aux_loss_alpha=1.0, device_loss_alpha=1.0, comm_loss_alpha=1.0, aux_loss_scores=how))
        moe(x)
        moe.aux_loss.backward()
        out[how] = (moe.losses, moe.gate.weight.grad)
    (losses_n, grad_n), (losses_r, grad_r) = out["normalized"], out["raw"]
    assert set(losses_n) == {"aux", "device", "comm"}
    for name in losses_n:
        torch.testing.assert_close(losses_n[name], losses_r[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_n, grad_r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("how", ["normalized", "raw"])
def test_sigmoid_aux_loss_gradient_direction(how):
    """Raw sigmoid P: every logit's gradient is >= 0, so a step lowers every expert's score, the least loaded
    one's too. Normalized P: the least loaded expert's logits get negative gradients, and a step moves
    probability from the most loaded expert to the least loaded one."""
    torch.manual_seed(0)
    T, E, K = 64, 8, 2
    logits = torch.randn(T, E)
    logits[:, 0] += 2.0  # expert 0 overloaded
    logits.requires_grad_(True)
    s = logits.sigmoid()
    ids = s.detach().topk(K, dim=-1).indices
    load = torch.bincount(ids.reshape(-1), minlength=E)
    most, least = int(load.argmax()), int(load.argmin())
    B.expert_balance_loss(B.loss_scores(s, how), ids).backward()
    grad = logits.grad
    with torch.no_grad():
        stepped = (logits - T * grad).sigmoid()
        if how == "raw":
            assert (grad >= 0).all()
            assert (stepped.mean(0) < s.mean(0)).all()  # every expert pushed down, the least loaded too
        else:
            assert (grad < 0).any() and (grad[:, least] < 0).all() and (grad[:, most] > 0).all()
            before, after = (B.loss_scores(v, "normalized").mean(0) for v in (s, stepped))
            assert after[most] < before[most] and after[least] > before[least]


def test_loss_scores_by_hand():
    s = torch.tensor([[0.8, 0.4, 0.8], [0.2, 0.6, 0.2]])
    torch.testing.assert_close(B.loss_scores(s, "normalized"), torch.tensor([[0.4, 0.2, 0.4], [0.2, 0.6, 0.2]]))
    assert B.loss_scores(s, "raw") is s
    assert B.loss_scores(torch.zeros(1, 3), "normalized").eq(0).all()  # no NaN from an all-zero row


@pytest.mark.parametrize("field,value", [("aux_loss_scores", "softmax"), ("seq_aux_experts", "all")],
                         ids=["aux-loss-scores", "seq-aux-experts"])
def test_bad_loss_choices_are_named(field, value):
    allowed = {"aux_loss_scores": "'normalized', 'raw'", "seq_aux_experts": "'topk', 'routed'"}[field]
    with pytest.raises(ValueError, match=f"{field}='{value}' is not allowed; choose one of {allowed}"):
        MoEConfig(**{field: value})


# --------------------------------------------------------------------------- sequence-wise loss

def test_sequence_loss_equals_expert_loss_on_one_sequence():
    torch.manual_seed(0)
    S, E, K = 12, 8, 3
    scores = torch.randn(S, E).softmax(-1)  # softmax rows sum to 1: the normalization is the identity
    ids = scores.topk(K, dim=-1).indices
    torch.testing.assert_close(B.sequence_balance_loss(scores[None], K), B.expert_balance_loss(scores, ids))


def test_sequence_loss_normalizes_sigmoid_scores_and_averages_sequences():
    torch.manual_seed(0)
    Bs, S, E, K = 3, 10, 8, 2
    scores = torch.randn(Bs, S, E).sigmoid()
    per_seq = []
    for b in range(Bs):
        normed = scores[b] / scores[b].sum(-1, keepdim=True)
        per_seq.append(B.expert_balance_loss(normed, scores[b].topk(K, dim=-1).indices))
    torch.testing.assert_close(B.sequence_balance_loss(scores, K), torch.stack(per_seq).mean())


# One sequence of 2 tokens, 4 softmax experts in 2 groups {0,1} {2,3}, K=2, one group per token (max score):
#   token 0: s = [0.4, 0.05, 0.35, 0.2] -> group 0 (0.4 > 0.35) -> routed {0, 1}; plain top-2 {0, 2}
#   token 1: s = [0.1, 0.2, 0.3, 0.4]   -> group 1                -> routed {3, 2}; plain top-2 {3, 2}
#   P = [0.25, 0.125, 0.325, 0.3]; f = count * E / (K*S) = count
#   routed (V2): f = [1, 1, 1, 1] -> sum P = 1.0;  top-K (V3): f = [1, 0, 2, 1] -> 0.25 + 0.65 + 0.3 = 1.2
SEQ_COUNTS = {"routed": 1.0, "topk": 1.2}


@pytest.mark.parametrize("experts,expected", SEQ_COUNTS.items(), ids=SEQ_COUNTS.keys())
def test_sequence_loss_counts_routed_or_topk_experts_under_a_group_limit(experts, expected):
    s = torch.tensor([[0.4, 0.05, 0.35, 0.2], [0.1, 0.2, 0.3, 0.4]])
    moe = identity_gate_layer(4, top_k=2, score_func="softmax", n_groups=2, topk_groups=1, group_score="max",
                              seq_aux_loss_alpha=1.0, seq_aux_experts=experts)
    moe(s.log()[None])  # softmax(log s) = s: one sequence of 2 tokens
    assert sorted(moe.tokens_per_expert.tolist()) == [1, 1, 1, 1]  # what was routed, in both cases
    torch.testing.assert_close(moe.losses["seq_aux"], torch.tensor(expected))


# --------------------------------------------------------------------------- device and communication losses

def test_device_and_comm_losses_are_one_when_balanced():
    E, G, K, T = 8, 4, 2, 16
    scores = torch.full((T, E), 1 / E)
    ids = round_robin_ids(T, K, E)  # each token takes experts 2j, 2j+1: one device, M = 1
    torch.testing.assert_close(B.device_balance_loss(scores, ids, G), torch.tensor(1.0))
    torch.testing.assert_close(B.comm_balance_loss(scores, ids, G, 1), torch.tensor(1.0))


def test_device_and_comm_losses_by_hand():
    # 4 experts on 2 devices {0,1} {2,3}; 2 tokens, K = 2
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    ids = torch.tensor([[0, 1], [0, 2]])
    P = scores.mean(0)  # [0.25, 0.25, 0.25, 0.25]
    f = torch.tensor([2.0, 1.0, 1.0, 0.0]) * 4 / (2 * 2)
    dev = (f[:2].mean() * P[:2].sum() + f[2:].mean() * P[2:].sum())
    torch.testing.assert_close(B.device_balance_loss(scores, ids, 2), dev)
    # devices reached: token 0 -> {0}, token 1 -> {0, 1}; f''_d = (G / (M*T)) * count_d with M = 2
    f2 = torch.tensor([2.0, 1.0]) * 2 / (2 * 2)
    comm = f2[0] * P[:2].sum() + f2[1] * P[2:].sum()
    torch.testing.assert_close(B.comm_balance_loss(scores, ids, 2, 2), comm)


# --------------------------------------------------------------------------- z-loss

def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse0 = math.log(2.0)
    lse1 = math.log(math.exp(1.0) + math.exp(2.0))
    torch.testing.assert_close(B.z_loss(logits), torch.tensor((lse0**2 + lse1**2) / 2))
    big = torch.tensor([[100.0, 100.0]])  # stable for large logits
    torch.testing.assert_close(B.z_loss(big), torch.tensor((100 + lse0) ** 2))

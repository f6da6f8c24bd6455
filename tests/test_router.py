"""The router (dsmoe.router): invariants of group-limited top-k routing, property-tested with hypothesis
(distinct ids, chosen experts inside kept groups, non-negative and normalized weights, a bias that picks
experts but never changes their weights), -inf masking under negative biased scores, excluded experts
against a slow reference, and hand examples."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmoe import MoEConfig, Router, route
from dsmoe.router import group_limit


@st.composite
def routing_cases(draw):
    G = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(1, 4))
    M = draw(st.integers(1, G))
    K = draw(st.integers(1, M * per_group))
    group_score = draw(st.sampled_from(["max", "top2"] if per_group >= 2 else ["max"]))
    cfg = MoEConfig(dim=4, n_routed_experts=G * per_group, top_k=K, expert_dim=4, n_shared_experts=0,
                    n_groups=G, topk_groups=M, group_score=group_score,
                    score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
                    norm_topk_prob=draw(st.booleans()), route_scale=draw(st.sampled_from([1.0, 2.5, 16.0])))
    T = draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits_TE = torch.randn(T, cfg.n_routed_experts, generator=gen) * 3
    bias_scale = draw(st.sampled_from([0.0, 0.1, 1.0, 100.0]))
    bias_E = torch.randn(cfg.n_routed_experts, generator=gen) * bias_scale
    return cfg, logits_TE, bias_E


def kept_groups(choice_TE: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """[T, G] bool: groups a token may use, recomputed plainly. Ties at the M-th score all count as kept."""
    T = choice_TE.shape[0]
    groups = choice_TE.view(T, cfg.n_groups, -1)
    if cfg.group_score == "top2":
        score_TG = groups.sort(-1, descending=True).values[..., :2].sum(-1)
    else:
        score_TG = groups.max(-1).values
    threshold_T = score_TG.sort(-1, descending=True).values[:, cfg.topk_groups - 1]
    return score_TG >= threshold_T[:, None]


def scores_of(logits_TE, cfg):
    return logits_TE.softmax(-1) if cfg.score_func == "softmax" else logits_TE.sigmoid()


@settings(max_examples=150, deadline=None)
@given(routing_cases())
def test_routing_invariants(case):
    cfg, logits_TE, bias_E = case
    weights_TK, ids_TK, scores_TE = route(logits_TE, bias_E, cfg)
    T, K = ids_TK.shape
    assert K == cfg.top_k
    # distinct experts per token
    assert all(len(set(row.tolist())) == K for row in ids_TK)
    # scores are the plain score function of the logits
    torch.testing.assert_close(scores_TE, scores_of(logits_TE, cfg))
    # every chosen expert lies in one of the token's kept groups
    if cfg.n_groups > 1:
        keep_TG = kept_groups(scores_TE + bias_E, cfg)
        group_TK = ids_TK // cfg.experts_per_group
        assert keep_TG.gather(1, group_TK).all()
    # the chosen experts are the top-K biased scores among the allowed ones
    choice_TE = scores_TE + bias_E
    if cfg.n_groups > 1:
        allowed_TE = keep_TG.repeat_interleave(cfg.experts_per_group, dim=1)
        choice_TE = choice_TE.masked_fill(~allowed_TE, float("-inf"))
    kth_T = choice_TE.sort(-1, descending=True).values[:, K - 1]
    assert (choice_TE.gather(1, ids_TK) >= kth_T[:, None]).all()
    # weights: non-negative, from the unbiased scores, normalized to route_scale when asked
    assert (weights_TK >= 0).all()
    raw_TK = scores_TE.gather(1, ids_TK)
    if cfg.norm_topk_prob:
        torch.testing.assert_close(weights_TK.sum(-1), torch.full((T,), cfg.route_scale))
        raw_TK = raw_TK / raw_TK.sum(-1, keepdim=True)
    torch.testing.assert_close(weights_TK, raw_TK * cfg.route_scale)


@settings(max_examples=60, deadline=None)
@given(routing_cases(), st.integers(0, 2**31 - 1))
def test_bias_never_changes_weights(case, seed):
    """Any bias that leads to the same ids gives exactly the same weights."""
    cfg, logits_TE, bias_E = case
    w1, ids1, _ = route(logits_TE, bias_E, cfg)
    # a bias that keeps the choice: a constant shift (the order of s + b is unchanged up to rounding of
    # near-ties, so compare token by token where the ids agree, and require that nearly all do)
    w2, ids2, _ = route(logits_TE, bias_E + 7.0, cfg)
    same_T = (ids1 == ids2).all(-1)
    assert same_T.float().mean() >= 0.5
    assert torch.equal(w1[same_T], w2[same_T])
    # any other bias: whatever it picks, the weights are the unbiased scores at those ids
    other_E = torch.randn(cfg.n_routed_experts, generator=torch.Generator().manual_seed(seed)) * 10
    w3, ids3, scores_TE = route(logits_TE, other_E, cfg)
    raw = scores_TE.gather(1, ids3)
    if cfg.norm_topk_prob:
        raw = raw / raw.sum(-1, keepdim=True)
    torch.testing.assert_close(w3, raw * cfg.route_scale)


@pytest.mark.parametrize("group_score", ["max", "top2"])
def test_minus_inf_mask_with_negative_biased_scores(group_score):
    """A large negative bias makes every choice negative; masked experts must still never be picked
    (a 0.0 mask would make every discarded expert beat every kept one)."""
    cfg = MoEConfig(dim=4, n_routed_experts=8, top_k=2, expert_dim=4, n_groups=4, topk_groups=1,
                    group_score=group_score, score_func="sigmoid")
    torch.manual_seed(0)
    logits_TE = torch.randn(32, 8)
    bias_E = torch.full((8,), -50.0)
    _, ids_TK, scores_TE = route(logits_TE, bias_E, cfg)
    keep_TG = kept_groups(scores_TE + bias_E, cfg)
    assert keep_TG.sum(-1).eq(1).all()  # no ties at this scale: exactly one group per token
    group_TK = ids_TK // 2
    assert keep_TG.gather(1, group_TK).all()
    assert (group_TK[:, 0] == group_TK[:, 1]).all()  # both picks from the single kept group
    masked = group_limit(scores_TE + bias_E, 4, 1, group_score)
    assert torch.isinf(masked).sum() == 32 * 6 and (masked[torch.isinf(masked)] < 0).all()


def test_group_limit_by_hand():
    # groups of 3: scores [0.9 0.1 0.1 | 0.5 0.5 0.4 | 0 0 0]
    choice = torch.tensor([[0.9, 0.1, 0.1, 0.5, 0.5, 0.4, 0.0, 0.0, 0.0]])
    inf = float("-inf")
    by_max = group_limit(choice, 3, 1, "max")  # group 0 (0.9) wins on max
    assert torch.equal(by_max, torch.tensor([[0.9, 0.1, 0.1, inf, inf, inf, inf, inf, inf]]))
    choice[0, 5] = 0.6  # top2 sums: group 0 = 1.0, group 1 = 0.5 + 0.6 = 1.1, so group 1 wins
    by_top2 = group_limit(choice, 3, 1, "top2")
    assert by_top2[0, 3:6].isfinite().all() and torch.isinf(by_top2[0, :3]).all()
    assert torch.isinf(by_top2[0, 6:]).all()


def test_route_by_hand_v3_style():
    cfg = MoEConfig(dim=4, n_routed_experts=4, top_k=2, expert_dim=4, score_func="sigmoid",
                    norm_topk_prob=True, route_scale=2.5)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 1.0, 0.0])  # pushes expert 2 into the choice
    w, ids, s = route(logits, bias, cfg)
    assert ids.tolist() == [[2, 0]]
    s0, s2 = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(0.0))
    torch.testing.assert_close(w, torch.stack([s2, s0]).unsqueeze(0) / (s0 + s2) * 2.5)


def route_reference(logits_TE, bias_E, cfg, exclude_TE):
    """route() one token at a time in plain Python: drop the excluded experts, keep the top-M groups by the
    experts left, take the K best of what remains, weight them by their unbiased scores."""
    scores_TE = scores_of(logits_TE, cfg)
    per_group = cfg.n_routed_experts // cfg.n_groups
    weights, ids = [], []
    for t in range(logits_TE.shape[0]):
        choice = {e: float(scores_TE[t, e] + bias_E[e]) for e in range(cfg.n_routed_experts) if not exclude_TE[t, e]}
        if cfg.n_groups > 1:  # (the cases leave every group two experts or more)
            best = [sorted((c for e, c in choice.items() if e // per_group == g), reverse=True)
                    for g in range(cfg.n_groups)]
            group = [sum(b[:2]) if cfg.group_score == "top2" else b[0] for b in best]
            kept = sorted(range(cfg.n_groups), key=group.__getitem__, reverse=True)[:cfg.topk_groups]
            choice = {e: c for e, c in choice.items() if e // per_group in kept}
        picked = sorted(choice, key=choice.get, reverse=True)[:cfg.top_k]
        w = [float(scores_TE[t, e]) for e in picked]
        if cfg.norm_topk_prob:
            w = [v / sum(w) for v in w]
        ids.append(picked)
        weights.append([v * cfg.route_scale for v in w])
    return torch.tensor(weights), torch.tensor(ids)


EXCLUDE_CASES = {  # (G, M, group score, K, experts excluded per token); every kept group keeps >= 2 experts
    "flat": (1, 1, "max", 2, 3),
    "groups-max": (4, 2, "max", 3, 2),
    "groups-top2": (4, 2, "top2", 3, 2),
}


@pytest.mark.parametrize("G,M,group_score,K,n", EXCLUDE_CASES.values(), ids=EXCLUDE_CASES.keys())
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_route_exclude_matches_reference(G, M, group_score, K, n, score_func):
    """Excluded experts are never picked; the rest is routed as if they did not exist, weights unbiased."""
    cfg = MoEConfig(dim=4, n_routed_experts=16, top_k=K, expert_dim=4, n_shared_experts=0, n_groups=G,
                    topk_groups=M, group_score=group_score, score_func=score_func, norm_topk_prob=True,
                    route_scale=2.5)
    gen = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(64, 16, generator=gen) * 3
    bias_E = torch.randn(16, generator=gen) * 0.1
    exclude_TE = torch.rand(64, 16, generator=gen).argsort(-1)[:, :n]  # n random experts per token ...
    exclude_TE = torch.zeros(64, 16, dtype=torch.bool).scatter_(1, exclude_TE, True)  # ... as a mask
    weights_TK, ids_TK, _ = route(logits_TE, bias_E, cfg, exclude_TE)
    assert not exclude_TE.gather(1, ids_TK).any()
    ref_weights_TK, ref_ids_TK = route_reference(logits_TE, bias_E, cfg, exclude_TE)
    order, ref_order = ids_TK.argsort(-1), ref_ids_TK.argsort(-1)
    assert torch.equal(ids_TK.gather(1, order), ref_ids_TK.gather(1, ref_order))
    torch.testing.assert_close(weights_TK.gather(1, order), ref_weights_TK.gather(1, ref_order))


def test_uniform_routing_round_robin():
    cfg = MoEConfig(dim=4, n_routed_experts=4, top_k=2, expert_dim=4, uniform_routing=True)
    _, ids, _ = route(torch.randn(5, 4), None, cfg)
    assert ids.tolist() == [[0, 1], [2, 3], [0, 1], [2, 3], [0, 1]]


def test_router_module_fp32_and_shapes():
    cfg = MoEConfig(dim=8, n_routed_experts=6, top_k=3, expert_dim=4)
    router = Router(cfg)
    w, ids, s, logits = router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert w.shape == ids.shape == (5, 3) and s.shape == logits.shape == (5, 6)
    assert s.dtype == logits.dtype == w.dtype == torch.float32
    assert router.bias.dtype == torch.float32 and list(router.parameters()) == [router.weight]
    # an empty batch routes to nothing without error
    w, ids, s, logits = router(torch.randn(0, 8))
    assert ids.shape == (0, 3)


def test_router_logits_stay_fp32_under_bf16_autocast():
    """DeepSeek-V3 keeps the gate in fp32: autocast must not turn the router's matmul into bf16."""
    router = Router(MoEConfig(dim=8, n_routed_experts=4, n_shared_experts=0, top_k=2, expert_dim=4))
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights_TK, _, scores_TE, logits_TE = router(x)
    assert logits_TE.dtype == scores_TE.dtype == weights_TK.dtype == torch.float32
    torch.testing.assert_close(logits_TE, x @ router.weight.detach().T)  # not bf16-rounded

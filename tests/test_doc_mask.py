"""Document masking (MoETransformer.forward's docs_BS): a packed row of documents computes as each document
alone (logits, main and MTP losses, every parameter's gradient) for plain GQA attention and Multi-head Latent
Attention, with MoE layers and an MTP module; docs_BS of zeros equals no docs_BS; the derived mask and rotary
positions; bad docs_BS raise errors that name it.

The MoE layers keep their auxiliary losses off (the configs' default): the sequence-wise balance loss depends on
which tokens share a row, so it differs between a packed row and its documents. Routing itself is per token (the
balancing bias changes only in update_biases), so it is identical.
"""

import pytest
import torch

from dsmoe.attention import KVCache
from dsmoe.config import ModelConfig, MoEConfig
from dsmoe.model import MoETransformer, doc_mask

MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
CONFIGS = {
    "gqa-moe-mtp": dict(n_kv_heads=2, mtp_layers=1),
    "mla-moe-mtp": dict(**MLA, mtp_layers=1),
    "mla-qlora-halves-yarn": dict(**MLA, q_lora_rank=12, rope_interleave=False, first_k_dense=0, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 1.0,
        "mscale_all_dim": 1.0}),
    "gqa-dense-mtp2": dict(n_kv_heads=1, moe=None, first_k_dense=2, dense_hidden=48, mtp_layers=2),
}
LENGTHS = [[5, 7, 4], [9, 3, 4]]  # two packed rows of three documents each, 16 tokens
EQUAL = [[5, 5, 5], [5, 5, 5]]  # one length: as many positions per MTP depth in every document


def make_model(seed: int = 0, **kw) -> MoETransformer:
    moe = MoEConfig(dim=32, n_routed_experts=8, n_shared_experts=1, top_k=2, expert_dim=16,
                    score_func="sigmoid", norm_topk_prob=True, bias_update_speed=1e-3)
    base = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=32, first_k_dense=1, moe=moe)
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig(**{**base, **kw})).eval()


def packed_batch(seed: int = 1, lengths_per_row: list[list[int]] = LENGTHS):
    """(docs, idx_BS, targets_BS, docs_BS): docs[b][d] is (ids, targets) of one document alone, shape (1, L); its
    last target is -1 (the next document's first token is not its to predict); the rows are their concatenations."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for lengths in lengths_per_row:
        row = []
        for L in lengths:
            ids = torch.randint(0, 50, (1, L), generator=g)
            row.append((ids, torch.cat([ids[:, 1:], torch.full((1, 1), -1)], dim=1)))
        docs.append(row)
    idx = torch.cat([torch.cat([ids for ids, _ in row], dim=1) for row in docs])
    targets = torch.cat([torch.cat([t for _, t in row], dim=1) for row in docs])
    numbers = torch.tensor([[d for d, L in enumerate(lengths) for _ in range(L)] for lengths in lengths_per_row])
    return docs, idx, targets, numbers


def counts(targets_BS: torch.Tensor, k: int = 1) -> int:
    """Tokens a loss averages over: the main loss's (k = 0) or MTP depth k's, for one document alone."""
    return int((targets_BS[:, k:] != -1).sum())


# ----------------------------------------------------------------------------- the mask and positions


def test_doc_mask_positions_and_mask():
    mask_B1SS, pos_BS = doc_mask(torch.tensor([[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 3, 3]]))
    assert pos_BS.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert mask_B1SS.shape == (2, 1, 6, 6) and mask_B1SS.dtype == torch.bool
    assert mask_B1SS[0, 0, 4].tolist() == [False, False, False, True, True, False]
    assert torch.equal(mask_B1SS[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())


@pytest.mark.parametrize("kw", [CONFIGS["gqa-moe-mtp"], CONFIGS["mla-moe-mtp"]], ids=["gqa", "mla"])
def test_blocks_get_rotary_rows_of_document_positions(kw):
    """Rotary attention depends only on relative positions, so restarting them changes no result in exact
    arithmetic (the tests below would pass without it); it keeps the angles those of the documents alone."""
    model = make_model(**kw).train()
    _, idx, targets, numbers = packed_batch()
    seen = []
    for block in [model.layers[0], model.mtp[0].block]:
        block.attn.register_forward_pre_hook(lambda m, args: seen.append((args[1], args[3])))
    model(idx, targets, docs_BS=numbers)
    mask_B1SS, pos_BS = doc_mask(numbers)
    assert torch.equal(seen[0][0], model.rot[pos_BS]) and torch.equal(seen[0][1], mask_B1SS)
    mtp_mask_B1SS, mtp_pos_BS = doc_mask(numbers[:, :-1])  # depth 1 keeps the documents of its states
    assert torch.equal(seen[1][0], model.rot[mtp_pos_BS]) and torch.equal(seen[1][1], mtp_mask_B1SS)


# ----------------------------------------------------------------------------- packed equals alone


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_packed_forward_equals_documents_alone(kw):
    model = make_model(**kw)
    docs, idx, targets, numbers = packed_batch()
    with torch.no_grad():
        logits, loss = model(idx, targets, docs_BS=numbers)
        alone = [[model(ids, t) for ids, t in row] for row in docs]
    expected = torch.cat([torch.cat([lg for lg, _ in row], dim=1) for row in alone])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    n = [counts(t, 0) for row in docs for _, t in row]
    expected_loss = sum(c * lo for c, (_, lo) in zip(n, [x for row in alone for x in row])) / sum(n)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(idx)[0], logits, atol=1e-3)  # without docs_BS the documents do mix


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_packed_gradients_equal_documents_alone(kw):
    """Packed: the mean main loss plus the MTP loss (a mean over its own positions per depth, averaged over
    depths). Alone: each document's losses weighted by its share of the positions each mean counts, so the two
    sums are the same function. With two depths the documents hold as many positions per depth as each other
    (one weight per document for both depths)."""
    model = make_model(**kw).train()
    depths = model.cfg.mtp_layers
    docs, idx, targets, numbers = packed_batch(lengths_per_row=LENGTHS if depths < 2 else EQUAL)
    _, loss = model(idx, targets, docs_BS=numbers)
    (loss + model.mtp_loss).backward()
    packed = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    packed_mtp = model.mtp_loss.detach().clone()

    model.zero_grad(set_to_none=True)
    flat = [x for row in docs for x in row]
    n = sum(counts(t, 0) for _, t in flat)
    m = [sum(counts(t, k) for _, t in flat) for k in range(1, depths + 1)]
    mtp_total = torch.zeros(())
    for ids, t in flat:
        _, lo = model(ids, t)
        total = lo * counts(t, 0) / n
        if depths:
            mtp_total = mtp_total + model.mtp_loss.detach() * counts(t, 1) / m[0]
            total = total + model.mtp_loss * counts(t, 1) / m[0]
        total.backward()
    torch.testing.assert_close(packed_mtp, mtp_total, atol=1e-5, rtol=1e-5)
    assert (packed_mtp > 0) == (depths > 0)
    alone = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert packed.keys() == alone.keys() and packed
    for name, grad in packed.items():
        torch.testing.assert_close(grad, alone[name], atol=1e-5, rtol=1e-4, msg=lambda s, name=name: f"{name}: {s}")


# ----------------------------------------------------------------------------- one document


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_zero_docs_equal_no_docs(kw):
    model = make_model(**kw)
    _, idx, targets, _ = packed_batch()
    zeros = torch.zeros_like(idx)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets, docs_BS=zeros), model(idx, targets), atol=1e-6, rtol=1e-6)
        model.train()
        _, with_docs = model(idx, targets, docs_BS=zeros.int())
        mtp_with_docs = model.mtp_loss
        _, without = model(idx, targets)
    torch.testing.assert_close(with_docs, without, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mtp_with_docs, model.mtp_loss, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- bad arguments


BAD = {
    "shape": (lambda idx: torch.zeros(2, 17, dtype=torch.long), ValueError, "docs_BS has shape"),
    "float": (lambda idx: torch.zeros(idx.shape), TypeError, "docs_BS must hold integer document numbers"),
    "list": (lambda idx: [[0] * 16] * 2, TypeError, "docs_BS must be a torch.Tensor"),
    "device": (lambda idx: torch.zeros(idx.shape, dtype=torch.long, device="meta"), ValueError, "docs_BS is on meta"),
    "decreasing": (lambda idx: torch.tensor([[0] * 8 + [1] * 8, [1] * 8 + [0] * 8]), ValueError,
                   "docs_BS decreases along 1 row"),
}


@pytest.mark.parametrize("make, error, match", BAD.values(), ids=BAD.keys())
def test_bad_docs_raise(make, error, match):
    model = make_model()
    _, idx, _, _ = packed_batch()
    with pytest.raises(error, match=match):
        model(idx, docs_BS=make(idx))


def test_docs_with_a_cache_is_refused():
    model = make_model()
    _, idx, _, numbers = packed_batch()
    cache = KVCache(model.cfg.n_layers, 2, 16, model.layers[0].attn.cache_shapes(), idx.device, torch.float32)
    with pytest.raises(ValueError, match="docs_BS cannot be used with a KV cache"):
        model(idx, cache=cache, docs_BS=numbers)


def test_a_batch_with_every_target_ignored_has_zero_loss_not_nan():
    """A fine-tuning batch of prompt tokens only (every target -1) must not stop a run as a NaN loss would."""
    from dsmoe.model import next_token_loss
    logits = torch.randn(2, 5, 7, requires_grad=True)
    loss = next_token_loss(logits, torch.full((2, 5), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    targets = torch.randint(7, (2, 5))
    targets[0, :2] = -1
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(next_token_loss(logits, targets), expected)

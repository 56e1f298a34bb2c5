"""Block-diffusion / document masks against a brute-force double loop; FlexAttention and SDPA agree."""
from __future__ import annotations

import pytest
import torch

from training.diffusion import block_diffusion_mask
from training.diffusion.masks import block_causal_mask, dense_training_mask, flex_training_mask, training_mask
from training.model.attention import TiledMask, attend, tile_mask

pytestmark = pytest.mark.unit


def _brute(doc, bs):
    """The four rules of LLaDA2.0 Eq. 1 written out per (query, key) pair."""
    n = len(doc)
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for i in range(2 * n):
        for j in range(2 * n):
            qi, kj = i % n, j % n
            if doc[qi] != doc[kj]:
                continue
            qb, kb = qi // bs, kj // bs
            if i < n and j < n:
                m[i, j] = qb == kb
            elif i < n and j >= n:
                m[i, j] = kb < qb
            elif i >= n and j >= n:
                m[i, j] = kb <= qb
    return m


def _random_docs(n, gen):
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: int(torch.randint(0, 4, (1,), generator=gen))].add(1).tolist())
    doc = torch.zeros(n, dtype=torch.long)
    for c in cuts:
        doc[c:] += 1
    return doc


@pytest.mark.parametrize("seed", range(6))
def test_mask_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(4, 20, (1,), generator=gen))
    doc = _random_docs(n, gen)
    for bs in (1, 2, 3, 4, n):
        assert torch.equal(block_diffusion_mask(doc, bs), _brute(doc.tolist(), bs)), (doc.tolist(), bs)


def test_block_straddling_documents():
    # Block 1 = positions 4..7 holds the end of doc 0 and the start of doc 1: nothing may cross the boundary.
    doc = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    m = block_diffusion_mask(doc, 4)
    assert torch.equal(m, _brute(doc.tolist(), 4))
    n = len(doc)
    assert not m[6, 5] and not m[5, 6]  # same x_t block, different documents
    assert m[5, 4] and m[6, 7]
    assert not m[n + 6, n + 4]  # x_0 of doc 1 does not see x_0 of doc 0 in its own block
    assert m[5, n + 2] and not m[5, n + 4]  # x_t sees strictly earlier clean blocks only
    assert not m[n:, :n].any()  # x_0 never sees x_t


def test_batched_dense_mask_matches_per_sample_and_mdlm_is_document_mask():
    gen = torch.Generator().manual_seed(0)
    docs = torch.stack([_random_docs(16, gen) for _ in range(3)])
    dense = dense_training_mask(docs, 4)
    assert dense.shape == (3, 1, 32, 32)
    for b in range(3):
        assert torch.equal(dense[b, 0], block_diffusion_mask(docs[b], 4))
    mdlm = dense_training_mask(docs, 16)
    assert mdlm.shape == (3, 1, 16, 16)
    assert torch.equal(mdlm[:, 0], docs[:, :, None] == docs[:, None, :])


def test_block_causal_inference_mask_is_the_clean_stream_rule():
    doc = torch.zeros(12, dtype=torch.long)
    train = block_diffusion_mask(doc, 4)[12:, 12:]  # x_0 -> x_0 block
    valid = torch.ones(1, 12, dtype=torch.bool)
    infer = block_causal_mask(torch.arange(12), valid, 4)[0, 0]
    assert torch.equal(infer, train)
    valid[0, :3] = False  # left padding is invisible
    assert not block_causal_mask(torch.arange(4, 8), valid, 4)[0, 0, :, :3].any()


def test_flex_and_sdpa_paths_agree():
    """One compiled-flex shape (first compile is slow on CPU); the BlockMask and the dense mask give one output."""
    gen = torch.Generator().manual_seed(1)
    bsz, n, bs = 2, 64, 8
    docs = torch.stack([_random_docs(n, gen) for _ in range(bsz)])
    docs[1, 37:] = 7  # a document starting mid-block
    q = torch.randn(bsz, 4, 2 * n, 16, generator=gen)
    k = torch.randn(bsz, 2, 2 * n, 16, generator=gen)
    v = torch.randn(bsz, 2, 2 * n, 16, generator=gen)
    out_flex = attend(q, k, v, flex_training_mask(docs, bs))
    out_sdpa = attend(q, k, v, dense_training_mask(docs, bs))
    torch.testing.assert_close(out_flex, out_sdpa, atol=2e-5, rtol=1e-4)


def test_dense_path_refuses_a_mask_that_cannot_fit_with_the_numbers():
    from training.diffusion.masks import dense_training_mask
    doc = torch.zeros(64, 65536, dtype=torch.long)  # 64 sequences of 65,536 tokens: x_t || x_0 = 131,072 positions
    with pytest.raises(MemoryError, match=r"64 x 131072 x 131072 positions needs 1024\.0 GiB"):
        dense_training_mask(doc, 32)


@pytest.mark.e2e
def test_flex_mask_at_seq_len_8192_follows_the_rule():
    """seq_len 8192 with x_0: 16,384 positions on the FlexAttention path (the dense path would need 256 MiB per
    sequence); the block mask agrees with the rule at sampled positions, across a document boundary."""
    from training.diffusion.masks import bd_mask_mod, flex_training_mask
    from training.diffusion.schedule import block_size_at
    L, bs = 8192, 32
    doc = torch.zeros(1, L, dtype=torch.long)
    doc[0, 5000:] = 1
    mask = flex_training_mask(doc, block_size_at([[0, bs]], 0, L))
    assert mask.shape == (1, 1, 2 * L, 2 * L)
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randint(0, 2 * L, (4000,), generator=g), torch.randint(0, 2 * L, (4000,), generator=g)
    zero = torch.zeros((), dtype=torch.long)
    want = bd_mask_mod(doc, bs)(zero, zero, q, kv)
    got = mask.mask_mod(zero, zero, q, kv)
    assert torch.equal(got, want) and want.any() and not want.all()
    # the tiles the kernel skips are empty in the rule: blocks of 128 x 128 in which no pair may attend
    dense_rows = mask.to_dense()[0, 0]  # [2L/128, 2L/128] tile occupancy
    qt, kt = q // 128, kv // 128
    assert bool(dense_rows[qt[want], kt[want]].all())  # every allowed pair lies in a computed tile


@pytest.mark.parametrize("block", [32, 128])  # block diffusion (x_t || x_0) and MDLM (the document mask alone)
def test_tiled_sdpa_equals_dense_sdpa_with_gradients(block):
    """The CPU training path runs SDPA over each query tile's visible key tiles only (training_mask): output and
    gradients equal dense SDPA over the whole mask, padding rows (a document that sees nothing) included."""
    gen = torch.Generator().manual_seed(3)
    doc = torch.stack([torch.repeat_interleave(torch.arange(6), torch.tensor([20, 30, 14, 40, 6, 18])),
                       torch.repeat_interleave(torch.arange(3), torch.tensor([64, 50, 14]))])
    dense = dense_training_mask(doc, block)
    dense[0, :, 5] = False  # a query row that sees no key (attend lets it see itself)
    assert training_mask(doc, block, "sdpa").dtype == torch.bool  # sdpa: the dense reference
    tiled = training_mask(doc, block, "auto")
    assert isinstance(tiled, TiledMask) and tiled.keys.shape[-1] < dense.shape[-1] // tiled.tile
    tiled = tile_mask(dense)
    n = dense.shape[-1]
    q, k, v = (torch.randn(2, h, n, 16, generator=gen, requires_grad=True) for h in (4, 2, 2))
    grads = []
    for m in (dense, tiled):
        out = attend(q, k, v, m)
        (out * torch.linspace(-1, 1, 16)).sum().backward()
        grads.append((out.detach(), *(t.grad.clone() for t in (q, k, v))))
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    full = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    assert tile_mask(full) is full  # nothing to skip: the dense mask is kept

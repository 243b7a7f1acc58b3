"""Block-mask builders (diffrt.kernels.attention_masks) against brute force over token pairs."""
from __future__ import annotations

import math

import pytest
import torch
from diffrt.kernels import BlockMask, attention_masks as masks


def _pool(allowed: torch.Tensor, q_block: int, k_block: int) -> torch.Tensor:
    """Token mask [Lq, Lk] -> block mask [nqb, nkb]: a block pair is active if any pair in it is allowed."""
    lq, lk = allowed.shape
    nq, nk = -(-lq // q_block), -(-lk // k_block)
    padded = torch.zeros(nq * q_block, nk * k_block, dtype=torch.bool)
    padded[:lq, :lk] = allowed
    return padded.reshape(nq, q_block, nk, k_block).any(dim=3).any(dim=1)


def _brute_window(q_grid, k_grid, radius, stride):
    q_pos = torch.cartesian_prod(*[torch.arange(n) for n in q_grid]).reshape(-1, len(q_grid))
    k_pos = torch.cartesian_prod(*[torch.arange(n) * s for n, s in zip(k_grid, stride)]).reshape(-1, len(k_grid))
    return ((q_pos[:, None] - k_pos[None]).abs() <= torch.tensor(radius)).all(-1)


@pytest.mark.parametrize("grid, radius, q_block, k_block", [
    ((8, 8), 1, 16, 16), ((9, 13), (2, 3), 16, 32), ((3, 6, 7), 1, 32, 16), ((4, 5, 5), (0, 2, 1), 16, 16),
])
def test_local_window_is_exact_at_block_granularity(grid, radius, q_block, k_block):
    mask = masks.local_window(grid, radius, q_block, k_block)
    radii = [radius] * len(grid) if isinstance(radius, int) else list(radius)
    expected = _pool(_brute_window(grid, grid, radii, [1] * len(grid)), q_block, k_block)
    assert mask.active.shape == (1, 1, *expected.shape)
    assert torch.equal(mask.active[0, 0], expected)
    assert 0 < mask.density < 1


def test_local_window_over_downsampled_keys():
    grid, k_grid = (9, 10), (5, 5)
    mask = masks.local_window(grid, 2, 16, 16, k_grid=k_grid)
    expected = _pool(_brute_window(grid, k_grid, [2, 2], [2, 2]), 16, 16)
    assert (mask.q_len, mask.k_len) == (90, 25) and torch.equal(mask.active[0, 0], expected)


def test_local_window_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"grid must be \(h, w\) or \(t, h, w\)"):
        masks.local_window((64,), 1)
    with pytest.raises(ValueError, match="one per axis"):
        masks.local_window((8, 8), (1, 2, 3))


def test_global_tokens_open_their_rows_and_columns():
    base = masks.local_window((8, 8), 0, 16, 16)
    mask = masks.global_tokens([0, 40], 64, 64, 16, 16, base=base)
    assert mask.active[0, 0, :, 0].all() and mask.active[0, 0, :, 2].all()  # everyone attends blocks 0 and 2
    assert mask.active[0, 0, 0].all() and mask.active[0, 0, 2].all()  # blocks 0 and 2 attend everything
    assert torch.equal(mask.active[0, 0, 1, [1, 3]], base.active[0, 0, 1, [1, 3]])
    keys_only = masks.global_tokens([5], 64, 64, 16, 16, queries=False)
    assert keys_only.active[0, 0, :, 0].all() and keys_only.active.sum() == 4
    with pytest.raises(ValueError, match="token indices must be in 0..63"):
        masks.global_tokens([64], 64, 64, 16, 16)


def test_union_and_dense():
    a = masks.local_window((8, 8), 0, 16, 16)
    b = masks.global_tokens([63], 64, 64, 16, 16, queries=False)
    both = masks.union(a, b)
    assert torch.equal(both.active, a.active | b.active)
    assert masks.dense(64, 64, 16, 16).density == 1.0
    with pytest.raises(ValueError, match="share lengths"):
        masks.union(a, masks.dense(64, 32, 16, 16))


def _clustered(batch, blocks, block, heads, dim, gen, spread=0.05):
    """Tokens near one direction per block (self-similar blocks)."""
    centres = torch.randn(batch, blocks, 1, heads, dim, generator=gen) * 3
    tokens = centres + spread * torch.randn(batch, blocks, block, heads, dim, generator=gen)
    return tokens.reshape(batch, blocks * block, heads, dim)


def test_dynamic_keeps_the_fewest_blocks_reaching_tau():
    gen = torch.Generator().manual_seed(0)
    q, k = _clustered(2, 4, 16, 2, 32, gen), _clustered(2, 6, 16, 2, 32, gen)
    tau = 0.9
    mask = masks.dynamic(q, k, 16, 16, tau=tau, min_similarity=0.5)
    assert mask.active.shape == (2, 2, 4, 6)
    q_mean = q.reshape(2, 4, 16, 2, 32).mean(2).permute(0, 2, 1, 3)
    k_mean = k.reshape(2, 6, 16, 2, 32).mean(2).permute(0, 2, 1, 3)
    probs = torch.softmax(q_mean @ k_mean.transpose(-1, -2) / math.sqrt(32), dim=-1)
    kept_mass = (probs * mask.active).sum(-1)
    assert (kept_mass >= tau - 1e-6).all()
    # minimal: dropping the least probable kept block falls below tau
    least = torch.where(mask.active, probs, torch.full_like(probs, math.inf)).min(-1).values
    assert ((kept_mass - least) < tau).all()
    assert mask.density < 1


def test_dynamic_topk_fraction_and_dense_dissimilar_blocks():
    gen = torch.Generator().manual_seed(1)
    q, k = _clustered(1, 4, 16, 1, 32, gen), _clustered(1, 8, 16, 1, 32, gen)
    mask = masks.dynamic(q, k, 16, 16, tau=None, topk=0.25, min_similarity=0.5)
    assert mask.active.sum(-1).eq(2).all()  # ceil(0.25 * 8) per query block
    q_noisy = q.clone()
    q_noisy[0, 16:32] = torch.randn(16, 1, 32, generator=gen)  # query block 1: random directions
    k_noisy = k.clone()
    k_noisy[0, 64:80] = torch.randn(16, 1, 32, generator=gen)  # key block 4
    noisy = masks.dynamic(q_noisy, k_noisy, 16, 16, tau=None, topk=0.25, min_similarity=0.5)
    assert noisy.active[0, 0, 1].all() and noisy.active[0, 0, :, 4].all()
    assert noisy.active[0, 0, 0].sum() <= 3


def test_dynamic_rejects_bad_arguments():
    q = torch.randn(1, 32, 1, 16)
    with pytest.raises(ValueError, match="exactly one of tau"):
        masks.dynamic(q, q, 16, 16, tau=0.9, topk=0.5)
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\]"):
        masks.dynamic(q, q, 16, 16, tau=1.5)
    with pytest.raises(ValueError, match="equal B, H, D"):
        masks.dynamic(q, torch.randn(1, 32, 2, 16), 16, 16)


def test_token_mask_and_density():
    active = torch.tensor([[[[True, False], [False, True]]]])
    mask = BlockMask(active, 16, 16, 20, 30)
    tokens = mask.token_mask()
    assert tokens.shape == (1, 1, 20, 30) and mask.density == 0.5
    assert tokens[0, 0, :16, :16].all() and not tokens[0, 0, :16, 16:].any() and tokens[0, 0, 16:, 16:].all()

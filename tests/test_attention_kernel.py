"""diffrt.kernels.attention: the Triton kernel (interpreted on CPU) and the torch backend against an fp64 truth.

Dense attention over head dims of real models (40/64/72/80/128/160/256), cross-attention lengths
(77 text tokens) and odd lengths, fp32 / fp16 / bf16; strided views; ToDo (nearest and average,
factors 2 and 3, grids that the factor does not divide); block masks (random, with fully masked
rows, broadcast and per-head); both together. A backend's error vs the fp64 truth may be at most
twice the error of plain PyTorch in the input dtype (the reference computed in that dtype). On
a GPU the same cases run on CUDA tensors (marked gpu).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
from diffrt.kernels import BackendUnavailable, BlockMask, KVDownsample, attention, attention_reference, registry
from diffrt.kernels import attention_spec

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [40, 64, 72, 80, 128, 160, 256]
LENGTHS = [(77, 77), (37, 77), (100, 45)]
BACKENDS = ["triton", "torch"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _qkv(batch, q_len, k_len, heads, dim, dtype, device, gen, value_dim=None):
    def randn(length, d):
        return torch.randn(batch, length, heads, d, generator=gen).to(device=device, dtype=dtype)
    return randn(q_len, dim), randn(k_len, dim), randn(k_len, value_dim or dim)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def assert_close_to_truth(out, q, k, v, **options):
    """out vs the fp64 truth: at most 2x the error of the reference run in the input dtype."""
    truth = attention_reference(q.cpu(), k.cpu(), v.cpu(), compute_dtype=torch.float64, **options)
    plain = attention_reference(q.cpu(), k.cpu(), v.cpu(), compute_dtype=q.dtype, **options)
    assert out.shape == truth.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    err, plain_err = _max_err(out, truth), _max_err(plain, truth)
    floor = torch.finfo(q.dtype).eps * truth.abs().max().item()  # an output rounding
    assert err <= 2 * max(plain_err, floor), f"error {err:.3g} vs plain {q.dtype} PyTorch {plain_err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_dense_matches_fp64(device, backend, lengths, dtype, head_dim):
    q, k, v = _qkv(1, *lengths, 2, head_dim, dtype, device, _gen(lengths, dtype, head_dim))
    assert_close_to_truth(attention(q, k, v, backend=backend), q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_value_dim_scale_and_batch(device, dtype):
    q, k, v = _qkv(3, 33, 50, 2, 64, dtype, device, _gen("vdim", dtype), value_dim=40)
    assert_close_to_truth(attention(q, k, v, scale=0.3, backend="triton"), q, k, v, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", [(4097, 77), (77, 4097)], ids=str)
def test_a_long_odd_sequence(device, lengths):
    """4097 queries or keys: a ragged last tile after 32 full ones (interpreted tiles of 128)."""
    q, k, v = _qkv(1, *lengths, 2, 64, torch.float16, device, _gen("4097", lengths))
    assert_close_to_truth(attention(q, k, v, backend="triton"), q, k, v)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_give_the_contiguous_result(device):
    """Heads split from a fused qkv projection, and [B, H, L, D] tensors seen as [B, L, H, D]: no copies needed."""
    batch, length, heads, dim = 2, 45, 3, 40
    packed = torch.randn(batch, length, 3 * heads * dim, generator=_gen("packed")).to(device, torch.float16)
    q, k, v = (packed[..., i * heads * dim:(i + 1) * heads * dim].view(batch, length, heads, dim) for i in range(3))
    assert not q.is_contiguous()
    out = attention(q, k, v, backend="triton")
    assert torch.equal(out, attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="triton"))
    bhld = torch.randn(batch, heads, length, dim, generator=_gen("bhld")).to(device, torch.float16)
    seen = bhld.transpose(1, 2)
    assert torch.equal(attention(seen, seen, seen, backend="triton"),
                       attention(seen.contiguous(), seen.contiguous(), seen.contiguous(), backend="triton"))
    assert_close_to_truth(out, q, k, v)


TODO_CASES = [((8, 8), 2, "nearest"), ((8, 8), 2, "average"), ((5, 7), 2, "nearest"), ((5, 7), 2, "average"),
              ((6, 9), 3, "average"), ((6, 9), 3, "nearest"), ((4, 4), 1, "average")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grid, factor, mode", TODO_CASES)
def test_todo_matches_downsample_then_attention(device, backend, dtype, grid, factor, mode):
    spec = KVDownsample(grid, factor, mode)
    tokens = grid[0] * grid[1]
    q, k, v = _qkv(2, tokens, tokens, 2, 40, dtype, device, _gen(grid, factor, mode, dtype))
    out = attention(q, k, v, kv_downsample=spec, backend=backend)
    assert_close_to_truth(out, q, k, v, kv_downsample=spec)
    if backend == "triton" and dtype == torch.float32:  # the same as attending the reference's downsampled copy
        pooled = attention(q, attention_spec.downsample_kv_reference(k, spec),
                           attention_spec.downsample_kv_reference(v, spec), backend="triton")
        torch.testing.assert_close(out, pooled, rtol=1e-5, atol=1e-6)


def test_todo_kernel_writes_no_pooled_copy(monkeypatch):
    """The Triton path reads K/V at the downsampled positions itself: the reference downsampler is never called."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the kernel path called the reference downsampler")

    q, k, v = _qkv(1, 64, 64, 2, 64, torch.float16, "cpu", _gen("nocopy"))
    spec = KVDownsample((8, 8), 2, "average")
    expected = attention_reference(q, k, v, kv_downsample=spec, compute_dtype=torch.float64)
    import diffrt.kernels.attention_launch as launch_module

    monkeypatch.setattr(attention_spec, "downsample_kv_reference", forbidden)
    monkeypatch.setattr(launch_module, "downsample_kv_reference", forbidden)
    out = attention(q, k, v, kv_downsample=spec, backend="triton")
    assert _max_err(out, expected) < 2e-3


def _random_mask(batch, heads, q_len, k_len, q_block, k_block, gen, density=0.5) -> BlockMask:
    n_q, n_k = -(-q_len // q_block), -(-k_len // k_block)
    active = torch.rand(batch, heads, n_q, n_k, generator=gen) < density
    active[0, 0, 0] = False  # one query block attends nothing
    active[-1, -1, -1, -1] = True
    return BlockMask(active, q_block, k_block, q_len, k_len)


MASK_CASES = [(1, 1, 16, 16), (2, 3, 16, 16), (1, 3, 32, 16), (2, 1, 16, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_batch, mask_heads, q_block, k_block", MASK_CASES)
def test_block_mask_matches_masked_softmax(device, backend, dtype, mask_batch, mask_heads, q_block, k_block):
    gen = _gen("mask", dtype, mask_batch, mask_heads, q_block, k_block)
    q, k, v = _qkv(2, 70, 77, 3, 72, dtype, device, gen)
    mask = _random_mask(mask_batch, mask_heads, 70, 77, q_block, k_block, gen)
    out = attention(q, k, v, block_mask=mask.to(device), backend=backend)
    assert_close_to_truth(out, q, k, v, block_mask=mask)
    empty_rows = slice(0, q_block)  # query block 0 of batch 0, head 0 attends nothing: exact zeros
    assert torch.equal(out[0, empty_rows, 0].float().cpu(), torch.zeros(q_block, 72))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_fully_masked_rows_are_zero(device, backend):
    q, k, v = _qkv(1, 20, 40, 1, 16, torch.float32, device, _gen("empty"))
    mask = BlockMask(torch.zeros(1, 1, 2, 3, dtype=torch.bool), 16, 16, 20, 40)
    out = attention(q, k, v, block_mask=mask.to(device), backend=backend)
    assert torch.equal(out.cpu(), torch.zeros(1, 20, 1, 16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["nearest", "average"])
def test_todo_with_a_block_mask_over_the_downsampled_keys(device, mode):
    spec = KVDownsample((9, 10), 2, mode)  # 90 tokens -> 5 x 5 = 25 keys
    gen = _gen("todo+mask", mode)
    q, k, v = _qkv(1, 90, 90, 2, 64, torch.float16, device, gen)
    mask = _random_mask(1, 2, 90, 25, 32, 16, gen, density=0.6)
    out = attention(q, k, v, kv_downsample=spec, block_mask=mask.to(device), backend="triton")
    assert_close_to_truth(out, q, k, v, kv_downsample=spec, block_mask=mask)


def test_block_mask_indices_list_active_blocks_in_order():
    active = torch.tensor([[[[True, False, True], [False, False, False]]]])
    index, count = BlockMask(active, 16, 16, 20, 40).indices()
    assert count.tolist() == [[[2, 0]]]
    assert index[0, 0, 0, :2].tolist() == [0, 2] and index.dtype == torch.int32


@pytest.mark.parametrize("change, error, message", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be \[B, L, H, D\]"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "q is torch.float32 on cpu but k is torch.float16"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "supported: float16, bfloat16, float32"),
    (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), ValueError, "the same B and H"),
    (lambda q, k, v: (q, k, v[:, :5]), ValueError, "the same B and H"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v), ValueError, "empty input"),
])
def test_bad_inputs_raise_with_the_shapes(change, error, message):
    q, k, v = _qkv(1, 10, 12, 2, 16, torch.float32, "cpu", _gen("bad"))
    with pytest.raises(error, match=message):
        attention(*change(q, k, v))


def test_bad_options_raise_with_the_sizes():
    q, k, v = _qkv(1, 16, 16, 2, 16, torch.float32, "cpu", _gen("bad options"))
    with pytest.raises(ValueError, match=r"grid \(4, 5\) has 20 tokens, k has 16"):
        attention(q, k, v, kv_downsample=KVDownsample((4, 5)))
    with pytest.raises(ValueError, match="block_mask is for 16 queries x 16 keys; this call has 16 x 4"):
        attention(q, k, v, kv_downsample=KVDownsample((4, 4)), block_mask=BlockMask(
            torch.ones(1, 1, 1, 1, dtype=torch.bool), 16, 16, 16, 16))
    with pytest.raises(ValueError, match="heads 1 or 2"):
        attention(q, k, v, block_mask=BlockMask(torch.ones(1, 3, 1, 1, dtype=torch.bool), 16, 16, 16, 16))
    with pytest.raises(ValueError, match="scale must be None or a finite number"):
        attention(q, k, v, scale=math.nan)
    with pytest.raises(ValueError, match="head dim 320 > 256"):
        big = torch.zeros(1, 4, 1, 320)
        attention(big, big, big)
    with pytest.raises(ValueError, match="power of two >= 16"):
        BlockMask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 8, 16, 16, 32)
    with pytest.raises(ValueError, match="need \\(2, 2\\)"):
        BlockMask(torch.ones(1, 1, 1, 2, dtype=torch.bool), 16, 16, 32, 32)
    with pytest.raises(ValueError, match="mode must be one of nearest, average"):
        KVDownsample((4, 4), 2, "max")


def test_auto_never_interprets_and_explains_why(monkeypatch):
    q, k, v = _qkv(1, 8, 8, 1, 16, torch.float32, "cpu", _gen("auto"))
    lines = registry.explain("attention", q, k, v)
    assert any(line.strip().startswith("torch: chosen") for line in lines)
    assert any("only when requested by name" in line for line in lines)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    registry.clear_cache()
    try:
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
            attention(q, k, v, backend="triton")
    finally:
        registry.clear_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, mode", [(64, "nearest"), (72, "average"), (160, None)])
def test_every_autotune_candidate_computes_the_same(monkeypatch, head_dim, mode):
    """On CUDA the first call of a shape class times several tiles (TMA ones too on Hopper): the chosen one
    and each candidate are right."""
    from diffrt.kernels import attention_launch, attention_tiles, autotune

    q, k, v = _qkv(2, 400, 400, 3, head_dim, torch.float16, "cuda", _gen("tune", head_dim, mode))
    spec = None if mode is None else KVDownsample((25, 16) if mode == "nearest" else (20, 20), 2, mode)
    monkeypatch.setenv("DIFFRT_AUTOTUNE", "1")
    autotune.clear()
    assert_close_to_truth(attention(q, k, v, kv_downsample=spec, backend="triton"), q, k, v, kv_downsample=spec)
    code = 0 if mode is None else attention_launch.MODE_CODES[mode]
    down = (code, 1, 1, 1, 1) if spec is None else (code, 2, *spec.grid, spec.out_grid[1])
    arch = torch.cuda.get_device_capability(q.device)[0]
    tma = attention_tiles.tma_available(q, k, v, down, arch)
    assert tma == (arch == 9 and mode != "average")  # nearest: a downsampled width of 8
    for tile in attention_tiles.candidates(head_dim, head_dim, None, code, q.dtype, tma, arch):
        monkeypatch.setattr(attention_tiles, "choose_tiles", lambda *args, tile=tile, **kwargs: tile)
        out = attention(q, k, v, kv_downsample=spec, backend="triton")
        assert_close_to_truth(out, q, k, v, kv_downsample=spec)


# ----------------------------------------------------------------- kernel variants, launched directly
def _launch_kernel(q, k, v, scale=None, spec=None, mask=None, block=(32, 16), tma=False, split=(1, 1)):
    """attention_triton.launch with a chosen tile and read path, into a NaN-poisoned output (``split``: a mask's
    blocks as (query, key) tiles of a part of them each)."""
    from diffrt.kernels import attention_launch, attention_triton

    out = torch.full((*q.shape[:3], v.shape[3]), math.nan, dtype=q.dtype)
    if spec is None:
        down = (0, 1, 1, 1, 1)
    else:
        down = (attention_launch.MODE_CODES[spec.mode], spec.factor, *spec.grid, spec.out_grid[1])
    tables = (None, None, (0, 0, 0), (0, 0, 0))
    if mask is not None:
        index, count = attention_launch.block_mask_tables(mask, q.device)
        tables = (index, count, attention_launch._broadcast_strides(index), attention_launch._broadcast_strides(count))
        block = (mask.q_block // split[0], mask.k_block // split[1])
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    attention_triton.launch(q, k, v, out, *tables, scale, down, *block, 4, 1, False, tma, *split)
    return out


SPLIT_LENGTHS = [(45, 77), (33, 64), (20, 10)]  # a ragged last key tile, only full tiles, one partial tile


@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("lengths", SPLIT_LENGTHS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [40, 64, 72])
def test_split_loop_dense_matches_fp64(tma, lengths, dtype, head_dim):
    """Full key tiles unmasked, the last one masked: keys past Lk never count, whichever read path."""
    q, k, v = _qkv(2, *lengths, 2, head_dim, dtype, "cpu", _gen("split", lengths, dtype, head_dim))
    assert_close_to_truth(_launch_kernel(q, k, v, tma=tma), q, k, v)


# downsampled widths 4, 4, 8, 4 (boxes of whole rows) and 32 (a box is half a row)
NEAREST_GRIDS = [((8, 8), 2), ((6, 8), 2), ((9, 16), 2), ((8, 16), 4), ((3, 64), 2)]


@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("grid, factor", NEAREST_GRIDS, ids=str)
@pytest.mark.parametrize("head_dim", [40, 72])
def test_nearest_read_paths_match_fp64(tma, grid, factor, head_dim):
    """ToDo nearest through pointers or through the strided tensor-descriptor view (boxes of whole rows)."""
    spec = KVDownsample(grid, factor, "nearest")
    tokens = grid[0] * grid[1]
    q, k, v = _qkv(1, 37, tokens, 2, head_dim, torch.float16, "cpu", _gen("nearest", grid, factor, head_dim))
    assert_close_to_truth(_launch_kernel(q, k, v, spec=spec, tma=tma), q, k, v, kv_downsample=spec)


@pytest.mark.parametrize("grid, factor", [((8, 8), 2), ((5, 7), 2), ((6, 9), 3)], ids=str)
@pytest.mark.parametrize("head_dim", [40, 72])
def test_split_loop_average_matches_fp64(grid, factor, head_dim):
    spec = KVDownsample(grid, factor, "average")
    tokens = grid[0] * grid[1]
    q, k, v = _qkv(1, 29, tokens, 2, head_dim, torch.float16, "cpu", _gen("average", grid, factor, head_dim))
    assert_close_to_truth(_launch_kernel(q, k, v, spec=spec, block=(32, 16)), q, k, v, kv_downsample=spec)


@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("k_len", [77, 64], ids=["ragged", "full"])
def test_split_loop_with_a_block_mask(tma, k_len):
    """The last listed key block is the masked one: ragged (77 keys) or full (64); empty rows stay 0."""
    gen = _gen("split mask", k_len)
    q, k, v = _qkv(2, 50, k_len, 2, 72, torch.float16, "cpu", gen)
    mask = _random_mask(2, 2, 50, k_len, 16, 16, gen)
    out = _launch_kernel(q, k, v, mask=mask, tma=tma)
    assert_close_to_truth(out, q, k, v, block_mask=mask)
    assert torch.equal(out[0, :16, 0].float(), torch.zeros(16, 72))


@pytest.mark.parametrize("k_len", [77, 64, 85], ids=["ragged", "full", "ragged-past-a-half"])
@pytest.mark.parametrize("split", [(2, 2), (4, 2), (1, 2)], ids=str)
def test_a_block_masks_blocks_split_into_smaller_tiles(split, k_len):
    """sm_80's tile for large head dims: a mask block of 64 x 32 as tiles of 64 / q_split rows and 16 keys; the
    last block's second key tile may lie past the keys (77 = 2 x 32 + 13: inside the first half; 85: a second
    half of 5 keys)."""
    gen = _gen("split blocks", split, k_len)
    q, k, v = _qkv(2, 100, k_len, 2, 40, torch.float16, "cpu", gen)
    mask = _random_mask(2, 2, 100, k_len, 64, 32, gen)
    out = _launch_kernel(q, k, v, mask=mask, split=split)
    assert_close_to_truth(out, q, k, v, block_mask=mask)
    assert torch.equal(out[0, :64, 0].float(), torch.zeros(64, 40))


@pytest.mark.parametrize("scale", [-0.2, 0.0], ids=["negative", "zero"])
def test_negative_and_zero_scales(scale):
    """The loop folds |scale| into one multiply-add: a negative scale negates q (exactly), zero weighs keys evenly."""
    q, k, v = _qkv(1, 45, 77, 2, 40, torch.float32, "cpu", _gen("scale", scale))
    assert_close_to_truth(attention(q, k, v, scale=scale, backend="triton"), q, k, v, scale=scale)


def test_stride_alignment_and_tma_layout():
    from diffrt.kernels.attention_triton import stride_alignment, tma_layout_ok, tma_reads

    x = torch.randn(2, 16, 8, 40, dtype=torch.float16)
    assert stride_alignment(x) == 8 and tma_layout_ok(x)  # 40 halves = 80 bytes: 16-byte rows
    assert stride_alignment(x.float()) == 4
    odd = torch.randn(2, 16, 3, 20, dtype=torch.float16)[..., 1:]  # head stride 20, columns shifted by one
    assert stride_alignment(odd) == 4 and not tma_layout_ok(odd)
    assert stride_alignment(torch.randn(1, 5, 3, 7, dtype=torch.float16)) == 1
    assert not tma_layout_ok(x.transpose(2, 3))  # last dim not contiguous
    assert tma_reads(x, x, (1, 2, 4, 4, 2))  # ToDo nearest, downsampled width 2
    assert not tma_reads(x, x, (1, 2, 4, 6, 3)) and not tma_reads(x, x, (2, 2, 4, 4, 2))  # width 3; average
    with pytest.raises(ValueError, match="tensor descriptors cannot read"):
        _launch_kernel(odd, odd, odd, tma=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_heuristic_leads_the_candidates_and_takes_tma_where_offered(dtype, mode, head_dim):
    from diffrt.kernels import attention_tiles

    for tma, arch in ((False, 8), (True, 9), (False, None)):
        tile = attention_tiles.heuristic(head_dim, head_dim, None, mode, dtype, tma, arch)
        options = attention_tiles.candidates(head_dim, head_dim, None, mode, dtype, tma, arch)
        assert options[0] == tile and len(set(options)) == len(options)
        assert tile.tma == (tma and mode != 2 and dtype != torch.float32)  # fp32 keeps pointers: fewer spills
        assert any(option.tma for option in options) == (tma and mode != 2)
        assert not any(option.tma for option in attention_tiles.candidates(head_dim, head_dim, None, mode, dtype))


def test_tma_is_offered_on_hopper_only():
    from diffrt.kernels import attention_tiles

    q = torch.randn(1, 16, 2, 64, dtype=torch.float16)
    assert attention_tiles._capability_major(q.device) is None
    assert not attention_tiles.tma_available(q, q, q, (0, 1, 1, 1, 1), None)
    assert attention_tiles.tma_available(q, q, q, (0, 1, 1, 1, 1), 9)
    assert not attention_tiles.tma_available(q, q, q, (0, 1, 1, 1, 1), 8)

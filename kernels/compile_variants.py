"""The calls :mod:`diffrt.kernels.compile_check` compiles: real model families' attention layers and GEMMs.

``ATTENTION_SHAPES``: one self- or cross-attention layer per entry, [B, L, H, D] inputs as the model's
attention processor passes them (contiguous; batch 2 where CFG doubles it). The names are the cases
of ``diffrt.bench.bench_attention`` (it measures the same shapes). ``GEMM_SHAPES``: W8A8 linears
(M = batch x tokens). The full set is every shape x dtype (fp16, bf16, fp32) x mode (dense; ToDo
nearest / average with factor 2 where the layer has a 2-D token grid; a block-sparse local window
where it has a 2-D / 3-D grid). The quick set is the CI gate's (``tests/test_kernel_gate.py``): fp16
and bf16 dense at every head dim real models use (40, 64, 72, 80, 96, 128, 160), ToDo and sparse
at a few, the largest tiles of each dtype and the INT8 GEMM's input kinds.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    """One realistic call of a kernel.

    ``kernel``: "attention" or "int8"; ``family``: the model family (sd15, sdxl, dit-xl-2, flux-like,
    sd3-like, video-dit, sweep); ``case``: the layer's name; ``dtype``: the input dtype.
    ``call`` for attention: batch, heads, head_dim, grid (query token grid, self-attention),
    optional k_len (cross-attention keys), todo ("nearest" / "average", factor 2), sparse (a
    64 x 64 local-window block mask); for int8: m, n, k, smooth, act (None / "gelu" / "silu"),
    out ("int32" for the raw accumulator, else the input's float dtype). ``tile``: None for the
    heuristic, else the launcher's tile (attention: (block_m, block_n, warps, stages); int8:
    (block_m, block_n, block_k, group_m, warps, stages)).
    """

    kernel: str
    family: str
    case: str
    dtype: str
    call: dict = field(default_factory=dict)
    tile: tuple | None = None

    @property
    def name(self) -> str:
        """A short unique label: kernel/case/dtype/options."""
        options = [f"{key}={value}" for key, value in sorted(self.call.items())
                   if key in ("todo", "sparse", "smooth", "act", "out") and value not in (None, False)]
        tile = [f"tile={'x'.join(map(str, self.tile))}"] if self.tile else []
        return "/".join([self.kernel, self.case, self.dtype, *options, *tile])


GATE_HEAD_DIMS = (40, 64, 72, 80, 96, 128, 160)
DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer: ``grid`` is the query token grid (1-D for joint text + image sequences);
    ``k_len`` the keys of a cross-attention (None: self-attention over the grid); ``layers``: how many
    such calls one denoiser forward makes (the roofline estimate sums over them)."""

    family: str
    case: str
    batch: int
    heads: int
    head_dim: int
    grid: tuple[int, ...]
    k_len: int | None = None
    layers: int = 1

    def modes(self) -> list[tuple[str | None, bool]]:
        """(todo, sparse) pairs this layer runs: dense; ToDo on a 2-D self-attention grid; sparse on 2-D / 3-D."""
        out = [(None, False)]
        if self.k_len is None and len(self.grid) == 2:
            out += [("nearest", False), ("average", False)]
        if self.k_len is None and len(self.grid) in (2, 3):
            out.append((None, True))
        return out

    def call(self, todo: str | None = None, sparse: bool = False) -> dict:
        call = {"batch": self.batch, "heads": self.heads, "head_dim": self.head_dim, "grid": self.grid}
        if self.k_len is not None:
            call["k_len"] = self.k_len
        if todo:
            call["todo"] = todo
        if sparse:
            call["sparse"] = True
        return call


# SD1.5 at 512^2: 64^2 / 32^2 / 16^2 latent tokens, 8 heads of 40 / 80 / 160, 5 transformer blocks per level
# (2 down + 3 up) with self- and cross-attention (77 text tokens); SDXL at 1024^2: 10 heads x 64 at 64^2 (10
# blocks), 20 heads x 64 at 32^2 (60 blocks incl. the mid block); DiT-XL/2: 28 blocks, 16 heads x 72; Flux-like:
# the zoo's 12 blocks, 24 heads x 128 over 4096 image + 512 text tokens; SD3-like (medium): 24 joint blocks, 24
# heads x 64 over 4096 + 333 tokens; video DiT: 28 blocks, 24 heads x 128 over 8 x 32 x 32 latent frames.
ATTENTION_SHAPES = [
    AttentionShape("sd15", "sd15-512-l0", 2, 8, 40, (64, 64), layers=5),
    AttentionShape("sd15", "sd15-512-cross", 2, 8, 40, (64, 64), k_len=77, layers=5),
    AttentionShape("sd15", "sd15-512-l1", 2, 8, 80, (32, 32), layers=5),
    AttentionShape("sd15", "sd15-512-l2", 2, 8, 160, (16, 16), layers=5),
    AttentionShape("sdxl", "sdxl-1024-l1", 2, 10, 64, (64, 64), layers=10),
    AttentionShape("sdxl", "sdxl-1024-l2", 2, 20, 64, (32, 32), layers=60),
    AttentionShape("sdxl", "sdxl-1024-cross", 2, 10, 64, (64, 64), k_len=77, layers=10),
    AttentionShape("dit-xl-2", "dit-xl-256", 2, 16, 72, (16, 16), layers=28),
    AttentionShape("dit-xl-2", "dit-xl-512", 2, 16, 72, (32, 32), layers=28),
    AttentionShape("flux-like", "flux-1024", 1, 24, 128, (64, 72), layers=12),
    AttentionShape("sd3-like", "sd3-1024", 2, 24, 64, (4429,), layers=24),
    AttentionShape("video-dit", "video-3d", 1, 24, 128, (8, 32, 32), layers=28),
    AttentionShape("sweep", "sweep-hd96", 2, 8, 96, (64, 64)),
    AttentionShape("sweep", "sweep-hd256", 2, 4, 256, (32, 32)),
]
SHAPES_BY_CASE = {shape.case: shape for shape in ATTENTION_SHAPES}

# The gate's dense layer per head dim, then (case, dtype, todo, sparse) extras: ToDo and sparse where models
# use them, the largest tiles of each dtype (fp32 at head dim 128, head dim 256: ToDo-average and sparse) and
# SD1.5's head-dim-160 ToDo-average and sparse (the most registers at a real head dim).
_GATE_DENSE = {40: "sd15-512-l0", 64: "sdxl-1024-l1", 72: "dit-xl-512", 80: "sd15-512-l1", 96: "sweep-hd96",
               128: "flux-1024", 160: "sd15-512-l2"}
_GATE_EXTRA = [("sd15-512-l0", "float16", "average", False), ("sdxl-1024-l1", "float16", "nearest", False),
               ("sdxl-1024-l1", "float16", "average", False), ("dit-xl-512", "float16", None, True),
               ("flux-1024", "bfloat16", "average", False), ("video-3d", "float16", None, True),
               ("sd15-512-cross", "float16", None, False), ("sd15-512-l2", "float16", "average", False),
               ("sd15-512-l2", "float16", None, True), ("sdxl-1024-l1", "float32", None, False),
               ("flux-1024", "float32", None, False), ("sweep-hd256", "float16", "average", False),
               ("sweep-hd256", "float32", "average", False), ("sweep-hd256", "float32", None, True)]


def attention_variants(quick: bool = False) -> list[Variant]:
    """The attention calls to compile (module docstring), each at the tile the untuned path runs."""
    if quick:
        picks = [(_GATE_DENSE[dim], dtype, None, False) for dim in GATE_HEAD_DIMS for dtype in DTYPES[:2]]
        picks += _GATE_EXTRA
        return [Variant("attention", SHAPES_BY_CASE[case].family, case, dtype, SHAPES_BY_CASE[case].call(todo, sparse))
                for case, dtype, todo, sparse in picks]
    return [Variant("attention", shape.family, shape.case, dtype, shape.call(todo, sparse))
            for shape in ATTENTION_SHAPES for todo, sparse in shape.modes() for dtype in DTYPES]


# (family, case, M, K, N): SD1.5's 64^2-level q/k/v/out and GEGLU input, SDXL's 32^2-level GEGLU input and
# feed-forward output, DiT-XL/2's MLP input at 256 tokens, and a decode-sized M (one sample's pooled rows).
GEMM_SHAPES = [("sd15", "sd15-qkvo@4096", 8192, 320, 320), ("sd15", "sd15-geglu@4096", 8192, 320, 2560),
               ("sdxl", "sdxl-geglu@1024", 2048, 1280, 10240), ("sdxl", "sdxl-ff_out@1024", 2048, 5120, 1280),
               ("dit-xl-2", "dit-xl-mlp_in@256", 512, 1152, 4608), ("small-m", "small-m", 32, 1280, 1280)]
# (input dtype, SmoothQuant, activation, output)
_GEMM_INPUTS = [("float16", False, None, None), ("bfloat16", True, "gelu", None), ("float32", False, "silu", None),
                ("int8", False, None, None), ("int8", False, None, "int32")]


def int8_variants(quick: bool = False) -> list[Variant]:
    """INT8 GEMM calls: every input kind at every GEMM shape (``quick``: at SD1.5's q/k/v/out and the small M)."""
    shapes = [s for s in GEMM_SHAPES if s[1] in ("sd15-qkvo@4096", "small-m")] if quick else GEMM_SHAPES
    out = []
    for (family, case, m, k, n), (dtype, smooth, act, result) in itertools.product(shapes, _GEMM_INPUTS):
        call = {"m": m, "n": n, "k": k, "smooth": smooth, "act": act, "out": result}
        out.append(Variant("int8", family, case, dtype, {key: value for key, value in call.items() if value}))
    return out

"""DigitsDiT: a small class-conditional Diffusion Transformer (Peebles & Xie 2023) for 16x16 digits.

Layout (shapes for the shipped config: 1x16x16 images, patch 2, hidden D = 256):

    x [B, 1, 16, 16] --patchify (conv k=s=patch)--> tokens [B, 64, D] + fixed 2D sin-cos pos-emb
    t [B] float      --sinusoidal(256) -> Linear -> SiLU -> Linear--> t_emb [B, D]
    y [B] int64      --Embedding(num_classes + 1, D)-------------> y_emb [B, D]   (row num_classes = null)
    c = t_emb + y_emb
    blocks k = 1..N: adaLN-Zero: (shift, scale, gate) x 2 = Linear(SiLU(c)) [B, 6D], zero-initialised
        h = h + gate_msa * Attn(LN(h) * (1 + scale_msa) + shift_msa)
        h = h + gate_mlp * MLP(LN(h) * (1 + scale_mlp) + shift_mlp)
    final layer: LN(h) * (1 + scale) + shift -> Linear(D, patch^2 * C) (zero-initialised) -> unpatchify

``forward(x, t, y, depth=k)`` exits after block k: the final layer reads block k's output, so
a model can be sampled (or given exit heads) at any depth. The null class (label
``num_classes``) is the unconditional input for classifier-free guidance; ``y=None`` means it.

Two small protocols connect it to the runtime without the runtime knowing this module:
:meth:`DigitsDiT.qkv_attention_layers` (diffrt's attention processors, :mod:`diffrt.runtime.attention`)
and :class:`~diffrt.runtime.early_exit.EarlyExitModel` (exit heads, :mod:`diffrt.runtime.models.exits`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import context

DEFAULT_CONFIG: dict[str, Any] = {
    "sample_size": 16, "in_channels": 1, "patch_size": 2, "hidden_size": 256, "num_blocks": 6,
    "num_heads": 4, "mlp_ratio": 2.0, "num_classes": 10, "freq_dim": 256,
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t [B] (float, model timesteps 0..999) -> [B, dim] fp32:
    [cos(t f_i), sin(t f_i)] with f_i = max_period^(-i / (dim/2)), i = 0..dim/2-1."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [grid*grid, dim] (half the channels per axis, row-major)."""
    def axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).to(torch.float64) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([axis(dim // 2, rows), axis(dim // 2, cols)], dim=1).to(torch.float32)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] * (1 + scale[B, D]) + shift[B, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear, torch's scaled_dot_product_attention, out Linear.

    ``processor`` (None by default) may replace the attention itself: it is called as
    ``processor(module, q, k, v)`` with q, k, v [B, L, H, Dh] (views of the qkv projection) and
    returns [B, L, H, Dh], or None to run the default. ``diffrt.runtime.optimize`` installs one.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.processor = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        out = None if self.processor is None else self.processor(self, *qkv.unbind(2))
        if out is None:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, L, Dh]
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.proj(out.reshape(batch, length, dim))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (gates start at zero, so the block starts as identity)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = h + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift_msa, scale_msa))
        return h + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + Linear to patch pixels; the Linear and the modulation start at zero."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(h), shift, scale))


class DigitsDiT(nn.Module):
    """Class-conditional DiT; ``forward(x [B,C,H,W], t [B], y [B] int64 | None, depth=None) -> eps [B,C,H,W]``.

    Keyword arguments are the config (see ``DEFAULT_CONFIG``); ``.config`` returns it and
    ``DigitsDiT.from_config(cfg)`` rebuilds the same architecture.
    """

    def __init__(self, **config: Any):
        super().__init__()
        unknown = set(config) - set(DEFAULT_CONFIG)
        if unknown:
            raise TypeError(f"unknown DigitsDiT config keys {sorted(unknown)}; expected {sorted(DEFAULT_CONFIG)}")
        cfg = {**DEFAULT_CONFIG, **config}
        self._config = cfg
        size, patch, dim = cfg["sample_size"], cfg["patch_size"], cfg["hidden_size"]
        if size % patch:
            raise ValueError(f"sample_size {size} is not divisible by patch_size {patch}")
        self.grid = size // patch
        self.null_class = cfg["num_classes"]
        self.x_embedder = nn.Conv2d(cfg["in_channels"], dim, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", sincos_pos_embed(dim, self.grid)[None], persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(cfg["freq_dim"], dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Embedding(cfg["num_classes"] + 1, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, cfg["num_heads"], cfg["mlp_ratio"]) for _ in range(cfg["num_blocks"]))
        self.final_layer = FinalLayer(dim, patch, cfg["in_channels"])
        self.reset_parameters()
        self.attach_exit_heads(None)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DigitsDiT:
        return cls(**config)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def reset_parameters(self) -> None:
        """DiT's initialisation: Xavier linears, N(0, 0.02) embeddings, zero adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens h [B, L, D] and conditioning c [B, D] (y=None: the null class)."""
        batch = x.shape[0]
        if y is None:
            y = torch.full((batch,), self.null_class, dtype=torch.long, device=x.device)
        if not torch.is_tensor(t) or t.dim() == 0:
            t = torch.as_tensor(t, device=x.device).reshape(1)
        t = t.expand(batch) if t.shape[0] == 1 else t
        y = y.to(device=x.device, dtype=torch.long).reshape(-1)
        y = y.expand(batch) if y.shape[0] == 1 else y
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        t_emb = self.t_embedder(timestep_embedding(t, self._config["freq_dim"]).to(x.dtype))
        return h, t_emb + self.y_embedder(y)

    def readout(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The final layer on tokens h [B, L, D] -> image [B, C, H, W]."""
        return self.unpatchify(self.final_layer(h, c))

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, p*p*C] -> [B, C, grid*p, grid*p] (token (i, j) fills pixels [i*p:(i+1)*p, j*p:(j+1)*p])."""
        patch, channels, grid = self._config["patch_size"], self._config["in_channels"], self.grid
        x = tokens.reshape(tokens.shape[0], grid, grid, patch, patch, channels)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(tokens.shape[0], channels, grid * patch, grid * patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                depth: int | None = None) -> torch.Tensor:
        """Predict the noise of x [B, C, H, W] at timesteps t [B]; ``depth`` (1..num_blocks) exits early."""
        if depth is None:
            depth = self.num_blocks
        if not 1 <= int(depth) <= self.num_blocks:
            raise ValueError(f"depth must be in 1..{self.num_blocks}, got {depth}")
        state = context.current().early_exit  # diffrt.runtime.early_exit: the rows may leave at an exit
        if state is not None and self.exit_heads is not None and depth == self.num_blocks:
            return self.exit_heads.exiting_forward(self, state, x, t, y)
        h, c = self.embed(x, t, y)
        for block in self.blocks[: int(depth)]:
            h = block(h, c)
        return self.readout(h, c)

    def qkv_attention_layers(self) -> list[tuple[str, nn.Module, int, int, tuple[int, int]]]:
        """(name, module, heads, head dim, token grid) of each attention module: the modules take a
        ``processor(module, q, k, v)`` (see :class:`Attention`), which ``diffrt.runtime.optimize`` installs."""
        return [(name, module, module.num_heads, module.qkv.out_features // 3 // module.num_heads, (self.grid, self.grid))
                for name, module in self.named_modules() if isinstance(module, Attention)]

    def attach_exit_heads(self, heads: nn.Module | None) -> None:
        """Attach (or, with None, remove) exit heads (:class:`~diffrt.runtime.models.exits.ExitHeads`: their
        ``exiting_forward`` runs while early exit is on, :mod:`diffrt.runtime.early_exit`). They are kept out
        of the DiT's own modules, so its state dict does not change; move them with the DiT yourself."""
        object.__setattr__(self, "exit_heads", heads)

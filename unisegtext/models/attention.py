"""Multi-head attention on `scaled_dot_product_attention` (xformers on CUDA when installed)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

try:  # optional: memory-efficient attention kernels on CUDA
    import xformers.ops as xops  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - not installed on CPU machines
    xops = None


class Attention(nn.Module):
    """Multi-head attention: queries (B, Lq, D) attend to keys/values (B, Lk, D)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        h = self.num_heads
        dropout = self.dropout if self.training else 0.0
        if xops is not None and query.is_cuda:
            q, k, v = (rearrange(t, "b l (h d) -> b l h d", h=h) for t in (self.q(query), self.k(key), self.v(value)))
            out = xops.memory_efficient_attention(q, k, v, p=dropout)
            return self.out(rearrange(out, "b l h d -> b l (h d)"))
        q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=h) for t in (self.q(query), self.k(key), self.v(value)))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.out(rearrange(out, "b h l d -> b l (h d)"))


def sine_position_encoding_3d(shape: tuple[int, int, int], dim: int, device, dtype) -> torch.Tensor:
    """Fixed 3D sinusoidal encodings of a (X, Y, Z) grid in [0, 1] coordinates, (X*Y*Z, dim)."""
    per_axis = (dim // 6) * 2  # sin + cos pairs per axis
    # max(.., 1): below 6 dims there are no frequencies (the encoding is all padding), not a ZeroDivisionError
    freqs = torch.exp(torch.arange(0, per_axis, 2, device=device, dtype=torch.float32) * (-math.log(1000.0) / max(per_axis, 1)))
    axes = [torch.linspace(0, 1, n, device=device) * 2 * math.pi for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)
    parts = []
    for a in range(3):
        angles = grid[:, a : a + 1] * freqs * 10.0
        parts += [angles.sin(), angles.cos()]
    enc = torch.cat(parts, dim=-1)
    if enc.shape[1] < dim:
        enc = F.pad(enc, (0, dim - enc.shape[1]))
    return enc.to(dtype)

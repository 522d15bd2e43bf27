"""Building blocks of InfGen: coordinates, INPE, attention blocks and the convolutional x8 decoder.

Coordinate convention (one place, used everywhere): positions are (y, x) in [0, 1], the centre of a cell
measured against the FINAL image extent, so the same physical point gets the same coordinate whatever the
grid size (pixel centres, not corners).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cell_centres(index: Tensor, cell: float, extent: float) -> Tensor:
    """Normalised centre of cells `index` of size `cell` in an axis of length `extent` (same units)."""
    return (index.to(torch.float32) * cell + cell / 2) / extent


def grid_coords(rows: Tensor, cols: Tensor, cell: float, height: float, width: float) -> Tensor:
    """(len(rows) * len(cols), 2) (y, x) coordinates of a grid of cells, row-major."""
    y = cell_centres(rows, cell, height)
    x = cell_centres(cols, cell, width)
    return torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).reshape(-1, 2)


class INPE(nn.Module):
    """Implicit neural positional embedding: (y, x) -> unit sphere -> random Fourier features -> MLP.

    The sphere map (ours; the paper does not give it) uses longitude/latitude in [-pi/3, pi/3]: far from
    the poles (where longitude collapses) and without wrap-around, so the map is smooth and injective.
    B is a fixed Gaussian matrix, a persistent buffer, so it travels with the weights.
    """

    def __init__(self, features: int, scale: float, hidden: int, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("fourier_matrix", torch.randn(features, 3, generator=g) * scale)  # (F, 3)
        self.mlp = nn.Sequential(nn.Linear(2 * features, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    @staticmethod
    def to_sphere(coords: Tensor) -> Tensor:
        lat = (coords[..., 0] - 0.5) * (2 * math.pi / 3)
        lon = (coords[..., 1] - 0.5) * (2 * math.pi / 3)
        return torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()], dim=-1)  # (..., 3)

    def forward(self, coords: Tensor) -> Tensor:
        # Always fp32, also under bf16/fp16 autocast: the phases reach ~100 rad, and bf16's 8-bit mantissa
        # would put errors of ~0.4 rad on them, i.e. blur every position.
        with torch.autocast(coords.device.type, enabled=False):
            p = self.to_sphere(coords.float())                                # (..., 3)
            proj = 2 * math.pi * p @ self.fourier_matrix.float().T            # (..., F)
            gamma = torch.cat([proj.cos(), proj.sin()], dim=-1)               # (..., 2F)
        return self.mlp(gamma.to(self.mlp[0].weight.dtype))                   # (..., D)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class SelfBlock(nn.Module):
    """Pre-norm transformer block over latent tokens (global self-attention)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:                                  # (B, N, D)
        B, N, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])          # (B, H, N, Dh)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Mask tokens (queries) gather content from latent tokens (keys/values), then an MLP.

    Mask tokens never attend to each other, so each output token is a function of the latent and its own
    coordinate only: decoding the tokens in any chunks gives exactly the same result.
    K/V depend only on the latent, so `kv()` runs once per decode and every chunk reuses it.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def kv(self, latent: Tensor) -> tuple[Tensor, Tensor]:                  # (B, L, D)
        B, L, D = latent.shape
        kv = self.kv_proj(self.norm_kv(latent)).view(B, L, 2, self.heads, D // self.heads)
        kv = kv.permute(2, 0, 3, 1, 4)                                        # (2, B, H, L, Dh)
        return kv[0], kv[1]

    def forward(self, x: Tensor, k: Tensor, v: Tensor, window: Tensor | None = None) -> Tensor:
        B, N, D = x.shape                                                     # (B, N, D)
        q = self.q(self.norm_q(x)).view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, H, N, Dh)
        if window is None:                                                    # global: every latent token
            a = F.scaled_dot_product_attention(q, k, v)                       # (B, H, N, Dh)
        else:                                                                 # local: K latent tokens / query
            # A batched matmul per query; SDPA's math path on 5-D inputs is slower on CPU.
            kw, vw = k[:, :, window], v[:, :, window]                         # (B, H, N, K, Dh)
            s = (q.unsqueeze(3) * q.shape[-1] ** -0.5) @ kw.transpose(-1, -2)    # (B, H, N, 1, K)
            a = (s.softmax(dim=-1) @ vw).squeeze(3)                           # (B, H, N, Dh)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


def window_indices(rows: Tensor, cols: Tensor, out_cell: float, height: int, width: int,
                   h: int, w: int, size: int) -> Tensor:
    """Flat latent indices of the size x size window around each query cell: (len(rows)*len(cols), K).

    The window is shifted (not clamped) at the latent border so it always holds min(size, h) distinct rows.
    """
    def axis(idx: Tensor, extent: int, n: int) -> Tensor:
        k = min(size, n)
        centre = torch.floor(cell_centres(idx, out_cell, extent) * n).long()
        start = (centre - size // 2).clamp(0, n - k)
        return start[:, None] + torch.arange(k, device=idx.device)             # (len(idx), k)

    ry, rx = axis(rows, height, h), axis(cols, width, w)
    flat = ry[:, None, :, None] * w + rx[None, :, None, :]                    # (ny, nx, ky, kx)
    return flat.reshape(len(rows) * len(cols), -1)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a residual; no normalisation, so the block is purely local."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


# _PHASE_TAPS[a, r, t]: output phase a (even/odd row) takes 3x3-tap t from low-resolution row offset r - 1.
_PHASE_TAPS = torch.tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 0]],
                            [[0, 0, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.float32)


def upsample_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv3x3(nearest_upsample_x2(x)), computed exactly at low resolution + pixel_shuffle.

    Same result and same weights as the plain form, without materialising the 4x larger upsampled map
    (less memory traffic; ~1.5x faster at full resolution on CPU). Zero padding maps to zero padding.
    """
    M = _PHASE_TAPS.to(conv.weight)
    w = torch.einsum("art,bsu,oitu->oabirs", M, M, conv.weight).reshape(-1, conv.in_channels, 3, 3)
    return F.pixel_shuffle(F.conv2d(x, w, conv.bias.repeat_interleave(4), padding=1), 2)


class ConvDecoder(nn.Module):
    """x8 upsampling decoder (nearest x2 + 3x3 conv, three times) in the style of the VAE decoder.

    No image-wide normalisation and a bounded receptive field (`radius_px`), so a tile decoded with a halo
    of that radius equals the same region of the full decode.
    """

    def __init__(self, dim: int, channels: tuple[int, ...], blocks: int):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.conv_in = nn.Conv2d(dim, c0, 3, padding=1)
        self.levels = nn.ModuleList()
        for i, c in enumerate((c0, c1, c2)):
            n_blocks = nn.Sequential(*[ResBlock(c) for _ in range(blocks)])
            up = nn.Conv2d(c, (c1, c2, c3)[i], 3, padding=1)
            self.levels.append(nn.ModuleDict(dict(blocks=n_blocks, up=up)))
        self.conv_out = nn.Conv2d(c3, 3, 3, padding=1)
        # Receptive radius in output pixels: a 3x3 conv at scale 1/s reaches s pixels.
        self.radius_px = 8 + sum(s * (2 * blocks + 0) + s // 2 for s in (8, 4, 2)) + 1

    def forward(self, x: Tensor) -> Tensor:                                   # (B, D, h8, w8)
        x = self.conv_in(x)                                                   # (B, c0, h8, w8)
        for level in self.levels:
            x = level["blocks"](x)
            x = upsample_conv(level["up"], x)                                 # (B, c, 2h, 2w)
        return self.conv_out(F.silu(x))                                       # (B, 3, 8 h8, 8 w8)

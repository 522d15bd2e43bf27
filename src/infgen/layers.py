"""Building blocks of InfGen: coordinates, INPE, attention blocks and the convolutional x8 decoder.

Coordinate convention (one place, used everywhere): positions are (y, x) in [0, 1], the centre of a cell
measured against the FINAL image extent, so the same physical point gets the same coordinate whatever the
grid size (pixel centres, not corners).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


def resample(image: Tensor, top: int, left: int, rows: int, cols: int, height: int, width: int) -> Tensor:
    """Pixels [top:top+rows, left:left+cols] of `image` (B, c, h, w) bicubically resized to (height, width).

    Equals that crop of F.interpolate(image, (height, width), mode="bicubic", align_corners=False) (test),
    without making the whole resized image: each output pixel is a function of its own coordinate only,
    so any tiling of the output gives the same pixels, and the result is continuous in the coordinate.
    """
    # Coordinates need fp32 or better: in bf16 (8-bit mantissa) a 4K row's pixel positions would collapse.
    work = image if image.dtype == torch.float64 else image.float()
    dev, dt = image.device, work.dtype
    y = ((torch.arange(top, top + rows, device=dev, dtype=dt) + 0.5) / height) * 2 - 1
    x = ((torch.arange(left, left + cols, device=dev, dtype=dt) + 0.5) / width) * 2 - 1
    grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)         # (rows, cols, 2) as (x, y)
    out = F.grid_sample(work, grid[None].expand(image.shape[0], -1, -1, -1), mode="bicubic",
                        padding_mode="border", align_corners=False)           # (B, c, rows, cols)
    return out.to(image.dtype)


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
    # Exact (erf) GELU: on this CPU PyTorch's bf16 tanh approximation runs 6.7x slower (62 vs 9.3 ms on an
    # 18k x 512 map, ~20 % of the mask tokens' time) and fp32's 1.3x slower. The two differ by at most
    # 4.7e-4, under bf16's own rounding (7.8e-3 at these values); the shipped weights were trained with tanh.
    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


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
        # Contiguous (once per decode, L x D): the windows gather from them once per tile, 3x faster
        # than from the permuted view (Windows.attend).
        return kv[0].contiguous(), kv[1].contiguous()

    def forward(self, x: Tensor, k: Tensor, v: Tensor, window: Windows | None = None) -> Tensor:
        B, N, D = x.shape                                                     # (B, N, D)
        q = self.q(self.norm_q(x)).view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, H, N, Dh)
        if window is None:                                                    # global: every latent token
            a = F.scaled_dot_product_attention(q, k, v)                       # (B, H, N, Dh)
        else:                                                                 # local: a window per latent cell
            a = window.attend(q, k, v)                                        # (B, H, N, Dh)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


SDPA_MAX_HEADS = 65535  # CUDA grid limit of the fused attention kernels (heads per call)


def hann_log_weight(d: Tensor, radius: float) -> Tensor:
    """log of the window weight cos^2(pi d / 2r) of a key at distance d (latent cells) from a query:
    1 at d = 0, falling smoothly to 0 (log: -inf) at |d| >= r, with zero slope at both ends."""
    w = torch.cos(d.clamp(-radius, radius) * (math.pi / (2 * radius))).pow(2)
    return torch.where(d.abs() < radius, w.clamp_min(1e-30).log(), torch.full_like(w, float("-inf")))


@dataclass
class Windows:
    """Local cross-attention of a (nr x nc) grid of query cells to size x size latent windows.

    Queries are grouped by the latent cell their centre falls in; each group gathers the size x size window
    around that cell (shifted, not clamped, at the latent border) once, and is one small dense attention
    (m queries x K keys). Groups are padded to the largest one. (Gathering K/V per query moved 9x the bytes
    through memory and was most of the mask tokens' time on CPU.)

    falloff=True (seam-free): every key's attention logit gets log w(dy) + log w(dx), a Hann window of the
    key's distance from the QUERY's own coordinate (in latent cells), radius size/2. A key's weight is 0
    exactly where it leaves the window, so the output is a continuous function of the query's coordinate,
    also where the query crosses a latent-cell border and its group (and window) changes: the keys that
    swap in or out there carry weight 0. Every key with a non-zero weight lies in the group's window (for a
    query in cell c: |c' + 0.5 - p| < size/2 implies |c' - c| <= size//2). Without falloff each query sees
    its cell's window with equal prior and the window jumps at cell borders: a lattice with the latent-cell
    period at upscales (the first bundled model, replaced, was trained so).
    """
    rows: Tensor                      # (nr,) padded slot of each query row: group * m_r + position
    cols: Tensor                      # (nc,)
    groups: tuple[int, int, int, int]  # (G_r, m_r, G_c, m_c): groups and slots per group on each axis
    kv_index: Tensor                  # (G_r * G_c, K) flat latent index of each group's window
    bias: Tensor | None = None        # (G_r * G_c, m_r * m_c, K) additive logit bias (falloff), or None

    @classmethod
    def build(cls, ys: Tensor, xs: Tensor, h: int, w: int, size: int, falloff: bool = False) -> "Windows":
        """ys, xs: ascending centres of the query rows and columns, in latent cells of the h x w latent."""
        def axis(p: Tensor, n: int):
            k = min(size, n)
            centre = torch.floor(p).long()                                         # latent cell, ascending
            first = torch.ones_like(centre, dtype=torch.bool)
            first[1:] = centre[1:] != centre[:-1]
            group = first.cumsum(0) - 1                                            # (len,) group of each
            pos = torch.arange(len(p), device=p.device) - first.nonzero().squeeze(1)[group]
            m = int(pos.max()) + 1
            start = (centre[first] - size // 2).clamp(0, n - k)
            window = start[:, None] + torch.arange(k, device=p.device)            # (G, k) latent cells
            log_w = None
            if falloff:  # (G, m, k); empty slots sit on their window's first key (finite, never read)
                slot_p = (window[:, :1] + 0.5).to(p.dtype).repeat(1, m)
                slot_p[group, pos] = p
                log_w = hann_log_weight(slot_p[:, :, None] - (window[:, None, :] + 0.5), size / 2)
            return group * m + pos, window, m, log_w

        slot_r, win_r, m_r, lw_r = axis(ys, h)
        slot_c, win_c, m_c, lw_c = axis(xs, w)
        flat = win_r[:, None, :, None] * w + win_c[None, :, None, :]            # (G_r, G_c, k_r, k_c)
        G_r, G_c = win_r.shape[0], win_c.shape[0]
        bias = None
        if falloff:                                                             # separable: rows + cols
            bias = lw_r[:, None, :, None, :, None] + lw_c[None, :, None, :, None, :]  # (G_r, G_c, m_r, m_c, k_r, k_c)
            bias = bias.reshape(G_r * G_c, m_r * m_c, -1)
        return cls(slot_r, slot_c, (G_r, m_r, G_c, m_c), flat.reshape(G_r * G_c, -1), bias)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, H, nr*nc, Dh), k/v (B, H, L, Dh) -> (B, H, nr*nc, Dh)."""
        B, H, N, Dh = q.shape
        G_r, m_r, G_c, m_c = self.groups
        nr, nc = len(self.rows), len(self.cols)
        slots = (slice(None), slice(None), self.rows[:, None], self.cols[None, :])
        qp = q.new_zeros(B, H, G_r * m_r, G_c * m_c, Dh)
        qp[slots] = q.view(B, H, nr, nc, Dh)                                  # empty slots stay 0
        qp = qp.view(B, H, G_r, m_r, G_c, m_c, Dh).transpose(3, 4)
        qp = qp.reshape(B, H * G_r * G_c, m_r * m_c, Dh)                      # (B, H*G, m, Dh)
        index = self.kv_index.flatten()                                      # index_select: ~1.25x faster
        kw = k.index_select(2, index).view(B, H * G_r * G_c, -1, Dh)          # (B, H*G, K, Dh)
        vw = v.index_select(2, index).view(B, H * G_r * G_c, -1, Dh)
        bias = None
        if self.bias is not None:                                             # same for every batch and head
            bias = self.bias.to(q.dtype)[None].expand(H, -1, -1, -1).reshape(1, H * G_r * G_c, m_r * m_c, -1)
        # CUDA's fused SDPA kernels launch one block per (batch, head) and fail above 65535 heads; at 1x
        # every query is its own group, so H*G exceeds that once a tile holds >= 16384 latent cells. The split
        # runs on every device, so the CPU tests cover it (never yet reached on a GPU: docs/benchmarks.md).
        step = SDPA_MAX_HEADS
        parts = [F.scaled_dot_product_attention(qp[:, i:i + step], kw[:, i:i + step], vw[:, i:i + step],
                                                attn_mask=None if bias is None else bias[:, i:i + step])
                 for i in range(0, qp.shape[1], step)]
        a = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)          # (B, H*G, m, Dh)
        a = a.view(B, H, G_r, G_c, m_r, m_c, Dh).transpose(3, 4).reshape(B, H, G_r * m_r, G_c * m_c, Dh)
        return a[slots].reshape(B, H, N, Dh)


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
        # channels_last: the same numbers, and oneDNN's convolutions run faster in that layout on this CPU
        # (bf16: InfGen's base, a copy of the codec's decoder, on a 190 x 340 latent 2.58 -> 0.87 s; fp32
        # gains less, e.g. the 8K pipeline's re-encode 5.15 -> 2.86 s; docs/benchmarks.md).
        x = self.conv_in(x.contiguous(memory_format=torch.channels_last))     # (B, c0, h8, w8)
        for level in self.levels:
            x = level["blocks"](x)
            x = upsample_conv(level["up"], x)                                 # (B, c, 2h, 2w)
        return self.conv_out(F.silu(x))                                       # (B, 3, 8 h8, 8 w8)

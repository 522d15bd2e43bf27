"""InfGen: decode a latent of any size into an image of any size in one pass.

    latent z (B, C, h, w) ──Linear──► latent tokens + INPE(latent grid) ──► self-attention blocks
                                                                               │ K/V (once per decode)
    mask tokens: learned vector + INPE(output grid) + scale ─► cross-attn + MLP blocks
                 one per 8x8 output cell, (ceil(H/8), ceil(W/8))                │
                                                   conv decoder (x8, local) ◄──┘ ─► crop to (H, W)
    optional base (config.base_channels): + bicubic resize to (H, W) of a conv decoder of z at 1x

`decode` is the one entry point that the CLI, evaluation, benchmarks, demo and diffusers adapter call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_module, save_module
from .config import DEFAULT_MAX_PIXELS, InfGenConfig
from .layers import INPE, ConvDecoder, CrossBlock, SelfBlock, Windows, cell_centres, grid_coords, resample
from .utils import progress_bar, trim_heap

# Bytes of estimated activations per tile when chunk_size is None. `bytes_per_cell` overestimates (measured
# RSS growth is about half), so the default holds `small` to ~125-cell fp32 / ~183-cell bf16 tiles.
DEFAULT_MEMORY_BUDGET = 768 << 20


@dataclass
class LatentContext:
    """What the mask tokens need from a latent; computed once per decode and shared by every tile."""
    kv: list[tuple[Tensor, Tensor]]  # per cross block: (B, heads, h*w, Dh) each
    h: int
    w: int
    base: Tensor | None = None        # (B, 3, 8h, 8w) the base decoder's image at 1x, if the model has one


class InfGen(nn.Module):
    def __init__(self, config: InfGenConfig):
        super().__init__()
        if not isinstance(config, InfGenConfig):
            raise TypeError(f"InfGen expects an InfGenConfig, got {type(config).__name__}")
        self.config = c = config
        D = c.hidden_size
        self.inpe = INPE(c.fourier_features, c.fourier_scale, c.inpe_hidden, D, seed=c.fourier_seed)
        self.latent_in = nn.Linear(c.latent_channels, D)
        self.latent_blocks = nn.ModuleList(SelfBlock(D, c.num_heads, c.mlp_ratio) for _ in range(c.latent_depth))
        self.mask_token = nn.Parameter(torch.zeros(D))
        self.scale_in = nn.Linear(2, D) if c.scale_embed else None
        self.blocks = nn.ModuleList(CrossBlock(D, c.num_heads, c.mask_mlp_ratio) for _ in range(c.depth))
        self.norm_out = nn.LayerNorm(D)
        self.decoder = ConvDecoder(D, c.decoder_channels, c.decoder_blocks)
        self.base = ConvDecoder(c.latent_channels, c.base_channels, c.base_blocks) if c.base_channels else None
        self.base_in = nn.Linear(3 * 64, D) if c.base_tokens else None
        if self.base_in is not None:      # starts at 0: adding it to a trained model leaves its output as is
            nn.init.zeros_(self.base_in.weight)
            nn.init.zeros_(self.base_in.bias)
        # Halo (in 8x8 cells) that covers the decoder's receptive field, plus one cell for nearest-upsample
        # alignment: a tile decoded with this halo equals the full decode.
        self.halo = math.ceil(self.decoder.radius_px / 8) + 1
        self.gradient_checkpointing = False
        nn.init.normal_(self.mask_token, std=0.02)

    @torch.no_grad()
    def init_base_from(self, decoder: ConvDecoder, keep_residual: bool = False) -> None:
        """Start from the codec's decoder: copy it (a ConvDecoder of raw latents, e.g. KLAutoencoder.decoder)
        into the base and zero the mask tokens' last layer, so that before any training a decode at any
        size is the codec's decode bicubically resized (the paper's baseline), exactly. keep_residual: leave
        the last layer as it is (a trained model moved onto a better decoder of the same latent space).

        Why (ours): trained from scratch on a CPU budget, transformer + decoder stayed ~6 dB below the
        codec's own decoder at 1x after 2,500 steps (soft blobs). Feeding the decoder a bilinearly upsampled
        latent instead is no shortcut: the codec's decoder renders it 5.7 dB below codec + bicubic at 2x.
        With a base the mask tokens learn only the residual, what resizing a decoded image cannot give
        (detail between latent cells), like arbitrary-scale SR networks that add a resized input (LTE).
        """
        if self.base is None:
            raise ValueError("init_base_from needs base_channels in the InfGen config (e.g. the codec's "
                             "decoder_channels)")
        src, dst = decoder.state_dict(), self.base.state_dict()
        bad = [k for k in dst if k not in src or src[k].shape != dst[k].shape]
        if bad or set(src) != set(dst):
            first = (bad or sorted(set(src) ^ set(dst)))[0]
            raise ValueError(f"the codec's decoder does not match base_channels={self.config.base_channels}, "
                             f"base_blocks={self.config.base_blocks} (first mismatch: {first}); "
                             "set them to the codec's decoder_channels and decoder_depth")
        self.base.load_state_dict(src)
        if not keep_residual:
            nn.init.zeros_(self.decoder.conv_out.weight)
            nn.init.zeros_(self.decoder.conv_out.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self.latent_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.latent_in.weight.device

    # -- the two halves of a decode -------------------------------------------------------------------
    def base_image(self, z: Tensor) -> Tensor | None:
        """The base decoder's image of raw latents z (B, C, h, w) at 1x: (B, 3, 8h, 8w); None without a base.
        Like the codec's decoder it is convolutional, so its memory grows with the latent, not the output."""
        return None if self.base is None else self.base(z.to(self.dtype))

    def context(self, z: Tensor, base: Tensor | None = None) -> LatentContext:
        """Latent tokens -> self-attention -> per-block K/V. z: (B, C, h, w) raw latents.
        base: z's base image when the caller has it (the pipeline's windows crop the whole latent's)."""
        c = self.config
        B, C, h, w = z.shape
        if base is None:
            base = self.base_image(z)                                          # (B, 3, 8h, 8w)
        elif self.base is None:
            raise ValueError("this model has no base decoder (config.base_channels), so it takes no base; "
                             "pass base=None")
        elif tuple(base.shape) != (B, 3, 8 * h, 8 * w):
            raise ValueError(f"base must be the base image of the {h} x {w} latent, (B, 3, 8h, 8w) = "
                             f"{(B, 3, 8 * h, 8 * w)}, got {tuple(base.shape)}")
        z = (z.to(self.dtype) - c.shift_factor) * c.scaling_factor              # VAE's unit-variance space
        coords = grid_coords(torch.arange(h, device=z.device), torch.arange(w, device=z.device), 1.0, h, w)
        x = self.latent_in(z.flatten(2).transpose(1, 2)) + self.inpe(coords)  # (B, h*w, D)
        for block in self.latent_blocks:
            x = self._run(block, x)
        return LatentContext([blk.kv(x) for blk in self.blocks], h, w, base)

    def tokens(self, ctx: LatentContext, ys: Tensor, xs: Tensor, cells: tuple[float, float]) -> Tensor:
        """Transformer half: features (B, len(ys) * len(xs), D) of the mask tokens centred at ys x xs.

        ys, xs: ascending query centres as fractions of the latent's extent (0..1 spans its h, w cells), for
        the cells of an output `cell_centres(rows, 8.0, height)`; the pipeline's windows place the cells of
        the whole image in a window's latent. cells: output cells per latent cell on each axis, what the
        scale embedding tells the tokens (how much detail to add)."""
        q = self.mask_token + self.inpe(torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2))
        if self.scale_in is not None:
            s = torch.tensor([math.log(cells[0]), math.log(cells[1])], device=self.device, dtype=self.dtype)
            q = q + self.scale_in(s)
        x = q.expand(ctx.kv[0][0].shape[0], -1, -1)                            # (B, n, D)
        window = None
        if self.config.attn_window:
            window = Windows.build(ys * ctx.h, xs * ctx.w, ctx.h, ctx.w, self.config.attn_window,
                                   falloff=self.config.attn_window_falloff == "hann")
        for block, (k, v) in zip(self.blocks, ctx.kv):
            x = self._run(block, x, k, v, window)
        return self.norm_out(x)                                                # (B, n, D)

    def render(self, ctx: LatentContext, height: int, width: int, region: tuple[int, int, int, int],
               halo: bool = True) -> Tensor:
        """Pixels of a region of 8x8 cells of an (height, width) output. region = (top, left, rows, cols),
        the one way the decode path names cells (forward, render, decode): pixels [8 top, 8 (top + rows))
        x [8 left, 8 (left + cols)).

        Returns (B, 3, <=8*n_rows, <=8*n_cols), unclamped, cropped at the image's bottom/right edge.
        The cells are decoded with a halo of `self.halo` cells (clipped at the image border), so the
        result equals the same region of a full decode. halo=False (training only) decodes the region
        alone, its convolutions zero-padded at the region's edge like a patch-trained SR network's.
        """
        r0, c0, r1, c1 = self._halo_box(region, height, width, self.halo if halo else 0)
        dev = self.device
        ys = cell_centres(torch.arange(r0, r1, device=dev), 8.0, height)     # fractions of the image
        xs = cell_centres(torch.arange(c0, c1, device=dev), 8.0, width)
        x = self.tokens(ctx, ys, xs, (math.ceil(height / 8) / ctx.h, math.ceil(width / 8) / ctx.w))
        return self.paint(x.view(x.shape[0], r1 - r0, c1 - c0, -1), ctx.base, height, width, (r0, c0), region)

    def paint(self, x: Tensor, base: Tensor | None, height: int, width: int, origin: tuple[int, int],
              region: tuple[int, int, int, int]) -> Tensor:
        """Decoder half: mask-token features x (B, nr, nc, D) of the cells from `origin` = (row, col) on ->
        the pixels of `region` (inside them; see `render`), with the base image (the latent's, at 1x)
        resized to (height, width) added. Cells of x outside the region are the decoder's halo."""
        (r0, c0), (nr, nc) = origin, x.shape[1:3]
        base_px = None
        if base is not None:  # the resized base at the decoded cells (per pixel: exact in any tiling)
            base_px = resample(base, 8 * r0, 8 * c0, 8 * nr, 8 * nc, height, width)
            if self.base_in is not None:                                       # each token sees its 8x8 px
                x = x + self.base_in(F.pixel_unshuffle(base_px, 8).permute(0, 2, 3, 1).to(x.dtype))
        # (B, nr, nc, D) is (B, D, nr, nc) in channels_last memory, the decoder's layout: no copy
        img = self.decoder(x.permute(0, 3, 1, 2))                             # (B, 3, 8nr, 8nc)
        top, left = 8 * (region[0] - r0), 8 * (region[1] - c0)
        bottom = min(8 * (region[0] + region[2]), height) - 8 * r0
        right = min(8 * (region[1] + region[3]), width) - 8 * c0
        img = img[:, :, top:bottom, left:right]
        if base_px is not None:                                                # residual over the resized base
            img = img + base_px[:, :, top:bottom, left:right].to(img.dtype)
        return img

    def _halo_box(self, region: tuple[int, int, int, int], height: int, width: int,
                  margin: int) -> tuple[int, int, int, int]:
        """(r0, c0, r1, c1): the region's cells grown by `margin` cells, clipped to the output's grid."""
        gh, gw = math.ceil(height / 8), math.ceil(width / 8)
        return (max(region[0] - margin, 0), max(region[1] - margin, 0),
                min(region[0] + region[2] + margin, gh), min(region[1] + region[3] + margin, gw))

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # -- training entry point -------------------------------------------------------------------------
    def forward(self, z: Tensor, height: int, width: int, region: tuple[int, int, int, int] | None = None,
                halo: bool = True) -> Tensor:
        """Differentiable decode for training: unclamped (B, 3, H, W), or only `region`.

        region = (top, left, rows, cols) in 8x8 cells: renders just that crop of the (height, width)
        output, at a cost independent of the full size; pixels [8*top : 8*(top+rows)] x [...] of the image.
        halo: see `render` (False: cheaper, the region's edge pixels see zero padding instead of neighbours).
        """
        region = self._check_region(region, math.ceil(height / 8), math.ceil(width / 8))
        return self.render(self.context(z), height, width, region, halo)

    # -- the decode path everything calls -------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, latents: Tensor, height: int, width: int, chunk_size: int | None = None, *,
               region: tuple[int, int, int, int] | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool = False) -> Tensor:
        """Decode raw (unscaled) latents (B, C, h, w) to images (B, 3, height, width) in [-1, 1].

        chunk_size: side of a tile in 8x8 output cells; None picks the largest tile whose activations fit
        `memory_budget` bytes. Any tiling gives the same result as a single-tile decode.
        region: (top, left, rows, cols) in 8x8 cells: only that crop of the (height, width) image,
        pixels [8 top, 8 (top + rows)) x [8 left, 8 (left + cols)) cut at the image's edge; equal to the
        same crop of the whole decode, at the cost of the crop (the pipeline's windows use it).
        max_pixels: refuse outputs above this many pixels per image (None lifts the cap).
        """
        check_latents(latents, self.config.latent_channels)
        height, width = check_size(height, width, max_pixels)
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        gh, gw = math.ceil(height / 8), math.ceil(width / 8)
        top, left, rows, cols = self._check_region(region, gh, gw)
        ctx = self.context(latents.to(self.device))
        tile = chunk_size or self.auto_chunk_size(latents.shape[0], memory_budget)
        return self._tiled(lambda r: self.render(ctx, height, width, r), latents.shape[0], height, width,
                           (top, left, rows, cols), tile, progress)

    @torch.inference_mode()
    def decode_features(self, features: Tensor, base: Tensor | None, height: int, width: int,
                        chunk_size: int | None = None, *, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                        progress: bool = False) -> Tensor:
        """Images (B, 3, height, width) in [-1, 1] from stored mask-token features (B, ceil(height/8),
        ceil(width/8), D), the transformer half done (the pipeline's windows stitch such a map); base: the
        latent's base image (`base_image`), or None for a model without one. Tiled like `decode`, each tile
        with the decoder's halo, so any tiling gives the same pixels."""
        B, gh, gw = features.shape[:3]
        if (gh, gw) != (math.ceil(height / 8), math.ceil(width / 8)):
            raise ValueError(f"features must hold the {math.ceil(height / 8)} x {math.ceil(width / 8)} cells of a "
                             f"{height} x {width} image, got {gh} x {gw}")
        if (base is None) != (self.base is None):
            raise ValueError("base must be the latent's base image exactly when the model has a base decoder")
        tile = chunk_size or self.auto_chunk_size(B, memory_budget)

        def paint(region):
            r0, c0, r1, c1 = self._halo_box(region, height, width, self.halo)
            return self.paint(features[:, r0:r1, c0:c1], base, height, width, (r0, c0), region)
        return self._tiled(paint, B, height, width, (0, 0, gh, gw), tile, progress)

    def _tiled(self, render, batch: int, height: int, width: int, region: tuple[int, int, int, int], tile: int,
               progress: bool) -> Tensor:
        """The region's pixels, clamped, rendered tile by tile: render((top, left, rows, cols)) -> pixels."""
        top, left, rows, cols = region
        out_h, out_w = min(8 * (top + rows), height) - 8 * top, min(8 * (left + cols), width) - 8 * left
        out = torch.empty(batch, 3, out_h, out_w, dtype=self.dtype, device=self.device)
        tiles = [(r, c) for r in range(top, top + rows, tile) for c in range(left, left + cols, tile)]
        bar = progress_bar(len(tiles), progress)
        for r, c in tiles:
            pix = render((r, c, min(tile, top + rows - r), min(tile, left + cols - c)))
            y, x = 8 * (r - top), 8 * (c - left)
            out[:, :, y: y + pix.shape[2], x: x + pix.shape[3]] = pix.clamp_(-1, 1)
            del pix
            if len(tiles) > 1 and out.device.type == "cpu":
                trim_heap()
            bar.update(1)
        bar.close()
        return out

    @staticmethod
    def _check_region(region, gh: int, gw: int) -> tuple[int, int, int, int]:
        """(top, left, rows, cols) of a gh x gw grid of cells, cut at its bottom/right edge; None: all."""
        if region is None:
            return 0, 0, gh, gw
        ok = (isinstance(region, (tuple, list)) and len(region) == 4
              and all(isinstance(v, int) and not isinstance(v, bool) for v in region))
        if not ok or not (0 <= region[0] < gh and 0 <= region[1] < gw and region[2] >= 1 and region[3] >= 1):
            raise ValueError(f"region must be (top, left, rows, cols) ints with 0 <= top < {gh}, 0 <= left < {gw} "
                             f"(the grid of 8x8 cells) and rows, cols >= 1, got {region!r}")
        top, left, rows, cols = region
        return top, left, min(rows, gh - top), min(cols, gw - left)

    def bytes_per_cell(self, batch: int) -> int:
        """Rough activation bytes per 8x8 output cell during a render (transformer + decoder)."""
        c = self.config
        elem = torch.finfo(self.dtype).bits // 8
        tokens = c.hidden_size * (8 + c.mask_mlp_ratio)        # q, x, mlp, padded window queries/outputs
        ch = c.decoder_channels
        conv = sum(4 ** i * ch[i] * 3 for i in range(4)) + 4 ** 3 * ch[2]      # ~3 live maps per level
        return int(batch * elem * (tokens + conv))

    def auto_chunk_size(self, batch: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
        cells = max(memory_budget // self.bytes_per_cell(batch), 1)
        return max(int(math.isqrt(cells)) - 2 * self.halo, 8)

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        save_module(self, "InfGen", self.config.to_dict(), path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "InfGen":
        return load_module(path, "InfGen", lambda d: cls(InfGenConfig.from_dict(d)), device, default_class="InfGen")


def check_latents(z, latent_channels: int) -> None:
    """Validate raw latents for a model of `latent_channels`: a finite float tensor (B, C, h, w), non-empty."""
    if not isinstance(z, Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(z).__name__}")
    if z.ndim != 4:
        raise ValueError(f"latents must have shape (B, C, h, w), got {z.ndim} dims {tuple(z.shape)}")
    B, C, h, w = z.shape
    if C != latent_channels:
        raise ValueError(f"latents have {C} channels, this model expects latent_channels="
                         f"{latent_channels} (shape {tuple(z.shape)})")
    if B < 1 or h < 1 or w < 1:
        raise ValueError(f"latents must be non-empty, got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"latents must be a floating-point tensor, got {z.dtype}")
    if not bool(torch.isfinite(z).all()):  # note: a sync point, cheap next to the decode
        raise ValueError("latents contain NaN or Inf values")


def check_size(height, width, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Validate an output size; returns (height, width) as ints."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(f"output size {width}x{height} = {height * width} pixels exceeds the cap of "
                         f"{max_pixels} pixels; pass max_pixels=None (CLI: --max-pixels) to lift it")
    return int(height), int(width)

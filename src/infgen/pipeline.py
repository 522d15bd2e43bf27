"""InfGenPipeline: a latent codec (frozen encoder + native decoder) and an InfGen decoder, as one object.

    pipe = InfGenPipeline.from_pretrained()            # bundled default; or a directory / hub id
    z = pipe.encode(images)                            # (B, 3, h, w) in [-1, 1] -> raw latents
    out = pipe.decode(z, height=H, width=W)            # InfGen at any size
    big = pipe.upscale(pil_image, height=H, width=W)   # PIL in, PIL out

Beyond what one pass was trained for, `decode` goes through two mechanisms (method.md):
- window decoding: a latent larger than the training latents is cut into windows with context margins,
  each seen by the transformer as its own latent (so it looks like a training example); a window computes
  the mask tokens of the output it owns, plus one latent cell cross-faded with its neighbours, into one
  feature map that the decoder renders once, so cost stays linear in output pixels and no seams show (the
  base decoder, convolutional like the codec's, runs once on the whole latent);
- training-free extrapolation: an output scale above the trained range is reached in steps of at most
  `max_step_scale`: decode, re-encode with the frozen encoder, decode bigger.
Every decode covers the image the latent was encoded from (`content`), not the encoder's padding to a
multiple of 8; `plan_passes` lists the passes from sizes alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .checkpoint import CheckpointError, atomic_write_bytes, read_json
from .codecs import LatentCodec, load_codec
from .config import DEFAULT_MAX_PIXELS
from .images import pil_to_tensor, tensor_to_pil  # noqa: F401  (part of this module's API)
from .model import InfGen, check_latents, check_size
from .utils import progress_bar

DEFAULT_BUNDLE = Path(__file__).parent / "assets" / "default"
BUNDLE_NAME = "bundle.json"


@dataclass
class BundleInfo:
    """What a bundle knows about its training; it sets when windows and extrapolation kick in."""
    train_latent: int = 32          # side of the training latents (input_size / 8)
    max_scale: float = 4.0          # largest output/latent scale seen in training (out_max / input_size)
    max_step_scale: float = 2.0     # per-step scale bound of the extrapolation loop
    window_margin: int = 4          # latent cells of context on each side of a window

    def __post_init__(self) -> None:
        checks = [("train_latent", int, 1), ("window_margin", int, 0)]
        for name, kind, low in checks:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, kind) or v < low:
                raise ValueError(f"BundleInfo.{name} must be an int >= {low}, got {v!r}")
        for name in ("max_scale", "max_step_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 1:
                raise ValueError(f"BundleInfo.{name} must be a number > 1, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "BundleInfo":
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise CheckpointError(f"unknown {BUNDLE_NAME} keys {unknown}; expected {sorted(cls.__dataclass_fields__)}")
        try:
            return cls(**d)
        except ValueError as e:
            raise CheckpointError(f"{BUNDLE_NAME}: {e}") from None


class InfGenPipeline:
    def __init__(self, model: InfGen, codec: LatentCodec | None = None, info: BundleInfo | None = None):
        self.model = model.eval()
        self.codec = codec.eval() if codec is not None else None
        self.info = info or BundleInfo()
        c = model.config
        if codec is not None and codec.latent_channels != c.latent_channels:
            raise ValueError(f"codec has {codec.latent_channels} latent channels, InfGen expects {c.latent_channels}")
        if codec is not None and not (math.isclose(codec.scaling_factor, c.scaling_factor, rel_tol=1e-6)
                                      and math.isclose(codec.shift_factor, c.shift_factor, abs_tol=1e-6)):
            raise ValueError(f"the codec's scaling/shift ({codec.scaling_factor}, {codec.shift_factor}) differ from "
                             f"the InfGen config's ({c.scaling_factor}, {c.shift_factor}): the InfGen was trained "
                             "on another latent space")

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "InfGenPipeline":
        """path: None (the bundled default), a bundle directory, or a hub id holding one.

        dtype: the InfGen decoder's dtype (e.g. torch.bfloat16: ~2x faster on CPUs with AVX512-BF16/AMX and on
        GPUs; outputs within ~1 8-bit level of fp32). The codec stays in its saved dtype."""
        path = Path(DEFAULT_BUNDLE if path is None else path)
        if not path.exists() and len(str(path).split("/")) == 2 and not str(path).startswith((".", "/")):
            from huggingface_hub import snapshot_download  # users with internet; never in tests
            path = Path(snapshot_download(str(path)))
        if not (path / "infgen").is_dir():
            raise CheckpointError(f"{path} is not an infgen bundle: expected {path}/infgen/ (an InfGen "
                                  f"checkpoint), {path}/codec/ and {path}/{BUNDLE_NAME}")
        model = InfGen.from_pretrained(path / "infgen", device=device)
        if dtype is not None:
            model = model.to(dtype)
        codec = load_codec(path / "codec", device=device) if (path / "codec").is_dir() else None
        info = BundleInfo.from_dict(read_json(path / BUNDLE_NAME)) if (path / BUNDLE_NAME).is_file() else None
        return cls(model, codec, info)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path / "infgen")
        if self.codec is not None:
            self.codec.save_pretrained(path / "codec")
        atomic_write_bytes(path / BUNDLE_NAME, json.dumps(asdict(self.info), indent=2).encode())

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- encode ------------------------------------------------------------------------------------------
    def _require_codec(self) -> LatentCodec:
        if self.codec is None:
            raise ValueError("this pipeline has no codec (encoder); load a bundle with a codec/ directory")
        return self.codec

    @torch.inference_mode()
    def encode(self, images: Tensor, tile: int = 768) -> Tensor:
        """Images (B, 3, h, w) in [-1, 1] -> raw latents (B, C, ceil(h/8), ceil(w/8)).

        Large images are encoded in tiles of `tile` px with a 64 px halo, aligned to 8 px, so memory stays
        bounded (exact for the bundled local autoencoder; a good approximation for GroupNorm VAEs). 768 px:
        the 4K path's 1152 x 648 intermediate is 2 tiles instead of 6, so less halo is encoded twice
        (`infgen bench --pipeline`, docs/benchmarks.md)."""
        codec = self._require_codec()
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a (B, 3, h, w) tensor, got {getattr(images, 'shape', type(images))}")
        B, _, h, w = images.shape
        if h * w <= tile * tile:
            return codec.encode(images)
        halo = 64  # > the bundled autoencoder encoder's receptive radius (46 px): tiles are exact
        lh, lw = math.ceil(h / 8), math.ceil(w / 8)
        out = None
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                y0, x0 = max(y - halo, 0), max(x - halo, 0)
                crop = images[:, :, y0: min(y + tile + halo, h), x0: min(x + tile + halo, w)]
                z = codec.encode(crop)
                if out is None:
                    out = torch.empty(B, z.shape[1], lh, lw, dtype=z.dtype, device=z.device)
                ty, tx = (y - y0) // 8, (x - x0) // 8
                ny, nx = math.ceil(min(tile, h - y) / 8), math.ceil(min(tile, w - x) / 8)
                out[:, :, y // 8: y // 8 + ny, x // 8: x // 8 + nx] = z[:, :, ty: ty + ny, tx: tx + nx]
        return out

    # -- decode ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, latents: Tensor, height: int, width: int, *, content: tuple[int, int] | None = None,
               chunk_size: int | None = None, extrapolate: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               progress: bool = False) -> Tensor:
        """Raw latents (B, C, h, w) -> images (B, 3, height, width) in [-1, 1]; the path every tool calls.

        content: (h, w) px of the image the latents were encoded from, when that is not 8x the latent (the
        encoder replicate-pads images to a multiple of 8); the output then covers that image, not its
        padding. None (latents from a diffusion model): the whole latent."""
        check_latents(latents, self.model.config.latent_channels)
        height, width = check_size(height, width, max_pixels)
        passes = plan_passes(self.info, tuple(latents.shape[-2:]), height, width, content,
                             extrapolate and self.codec is not None)
        for i, p in enumerate(passes):
            image = self._decode_once(latents, *p.decoded, chunk_size, progress)[:, :, :p.size[0], :p.size[1]]
            if i < len(passes) - 1:                                      # an extrapolation step: re-encode
                latents = self.encode(image)
        return image

    def _decode_once(self, z: Tensor, height: int, width: int, chunk_size: int | None, progress: bool) -> Tensor:
        if not windowed(self.info, *z.shape[-2:]):
            return self.model.decode(z, height, width, chunk_size, max_pixels=None, progress=progress)
        return self._decode_windows(z, height, width, chunk_size, progress)

    def _decode_windows(self, z: Tensor, height: int, width: int, chunk_size: int | None, progress: bool) -> Tensor:
        """Overlapping latent windows (core + `window_margin` cells of context), each seen by the transformer
        as its own latent, so that it looks like a training example. The windows' mask tokens are stitched
        into one feature map of the whole image and the decoder runs once over it: a window computes only the
        tokens it owns (from its start to the next window's start) plus a band of one latent cell on each
        side, where neighbours cross-fade linearly. The base decoder, convolutional like the codec's, runs
        once on the whole latent."""
        model = self.model
        z = z.to(self.device)
        base = model.base_image(z)                                        # (B, 3, 8h, 8w) or None
        features = self._window_features(z, base, height, width, progress)
        return model.decode_features(features, base, height, width, chunk_size, progress=progress)

    def _window_features(self, z: Tensor, base: Tensor | None, height: int, width: int,
                         progress: bool) -> Tensor:
        """The mask-token features of every 8x8 cell of the (height, width) output, (B, gh, gw, D), each from
        the windows that own it (cross-faded across the bands between windows)."""
        model = self.model
        B, _, h, w = z.shape
        core, m = self.info.train_latent, self.info.window_margin
        gh, gw = math.ceil(height / 8), math.ceil(width / 8)
        # Cell centres in latent cells of the whole latent (float64: 8K rows must not collapse).
        cy = (torch.arange(gh, dtype=torch.float64) * 8 + 4) * h / height
        cx = (torch.arange(gw, dtype=torch.float64) * 8 + 4) * w / width
        features = torch.zeros(B, gh, gw, model.config.hidden_size, dtype=model.dtype, device=self.device)
        starts_y, starts_x = _window_starts(h, core), _window_starts(w, core)
        fades_y = _fades(cy, starts_y, min(m, 1))                      # per window: (gh,) weights
        fades_x = _fades(cx, starts_x, min(m, 1))
        bar = progress_bar(len(starts_y) * len(starts_x), progress, desc="windows", unit="window")
        for y, fy in zip(starts_y, fades_y):
            for x, fx in zip(starts_x, fades_x):
                (ly0, ly1), (lx0, lx1) = _window(y, core, m, h), _window(x, core, m, w)
                rows, cols = fy.nonzero().squeeze(1), fx.nonzero().squeeze(1)  # the cells it renders
                if len(rows) == 0 or len(cols) == 0:                      # an output smaller than the windows
                    bar.update(1)
                    continue
                crop = None if base is None else base[:, :, 8 * ly0:8 * ly1, 8 * lx0:8 * lx1]
                ctx = model.context(z[:, :, ly0:ly1, lx0:lx1], crop)
                ys = ((cy[rows] - ly0) / (ly1 - ly0)).float().to(self.device)   # in the window's latent
                xs = ((cx[cols] - lx0) / (lx1 - lx0)).float().to(self.device)
                tok = model.tokens(ctx, ys, xs, (gh / h, gw / w)).view(B, len(rows), len(cols), -1)
                ramp = (fy[rows, None] * fx[None, cols]).to(tok.dtype).to(self.device)[..., None]
                r, c = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
                features[:, r, c] += tok * ramp
                bar.update(1)
        bar.close()
        return features

    # -- PIL convenience -----------------------------------------------------------------------------------
    def upscale(self, image: Image.Image, height: int, width: int, **kwargs) -> Image.Image:
        """Re-render a PIL image at (height, width): encode at its own size, decode at the new one."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"upscale expects a PIL.Image, got {type(image).__name__}")
        x = pil_to_tensor(image).to(self.device)
        z = self.encode(x)
        return tensor_to_pil(self.decode(z, height, width, content=tuple(x.shape[-2:]), **kwargs)[0])


@dataclass(frozen=True)
class DecodePass:
    """One decode of InfGenPipeline.decode: the latent's padded extent at `decoded` px, cropped to `size`."""
    latent: tuple[int, int]     # (h, w) of the latent decoded
    size: tuple[int, int]       # (h, w) px of the image the pass yields
    decoded: tuple[int, int]    # (h, w) px decoded: 8h x 8w at the pass's scale (>= size when padded)


def plan_passes(info: BundleInfo, latent: tuple[int, int], height: int, width: int,
                content: tuple[int, int] | None = None, extrapolate: bool = True) -> list[DecodePass]:
    """The passes InfGenPipeline.decode makes, from sizes alone (serve prices requests with it).

    An output scale above info.max_scale is reached in steps of at most info.max_step_scale: intermediate
    images of scale**(k/steps) the final size, rounded to multiples of 8 so that each re-encoded image fills
    its latent exactly; every pass decodes its latent's padded extent so that the content fills its size.
    (Equal steps: taking the full max_step_scale last, so that the big intermediate is smaller, was faster
    but scored 0.06 dB lower from 128^2 to 768^2, scripts/pipeline_quality.py.)"""
    h, w = latent
    content = _check_content(content, h, w)
    scale = max(height / content[0], width / content[1])
    sizes = []
    if extrapolate and scale > info.max_scale * 1.001:
        steps = math.ceil(math.log(scale) / math.log(info.max_step_scale) - 1e-9)
        for k in range(1, steps):
            f = scale ** (k / steps) / scale  # intermediate size as a fraction of the final one
            sizes.append((max(8 * round(height * f / 8), 8), max(8 * round(width * f / 8), 8)))
    passes = []
    for hk, wk in sizes + [(height, width)]:
        passes.append(DecodePass((h, w), (hk, wk), (round(hk * 8 * h / content[0]), round(wk * 8 * w / content[1]))))
        h, w, content = math.ceil(hk / 8), math.ceil(wk / 8), (hk, wk)
    return passes


def windowed(info: BundleInfo, h: int, w: int) -> bool:
    """Whether an (h, w) latent is decoded in windows (larger than a training latent with its margins)."""
    return h > info.train_latent + 2 * info.window_margin or w > info.train_latent + 2 * info.window_margin


def cells_read(info: BundleInfo, h: int, w: int) -> int:
    """Latent cells one decode pass of an (h, w) latent reads: all of them, or every window with its margins."""
    if not windowed(info, h, w):
        return h * w
    core, m = info.train_latent, info.window_margin
    span = [sum(hi - lo for lo, hi in (_window(s, core, m, n) for s in _window_starts(n, core))) for n in (h, w)]
    return span[0] * span[1]


def _check_content(content, h: int, w: int) -> tuple[int, int]:
    if content is None:
        return 8 * h, 8 * w
    ok = isinstance(content, (tuple, list)) and len(content) == 2 and \
        all(isinstance(v, int) and not isinstance(v, bool) for v in content)
    if not ok or not (8 * h - 8 < content[0] <= 8 * h and 8 * w - 8 < content[1] <= 8 * w):
        raise ValueError(f"content must be the (h, w) px of the image a {h} x {w} latent was encoded from: "
                         f"({8 * h - 7}..{8 * h}, {8 * w - 7}..{8 * w}), got {content!r}")
    return int(content[0]), int(content[1])


def _window_starts(n: int, core: int) -> list[int]:
    count = max(math.ceil(n / core), 1)
    step = n / count
    return [round(i * step) for i in range(count)] if count > 1 else [0]


def _window(start: int, core: int, margin: int, n: int) -> tuple[int, int]:
    """[lo, hi) latent cells of the window starting at `start` along an axis of n cells, context included."""
    return max(start - margin, 0), min(start + core + margin, n)


def _fades(centres: Tensor, starts: list[int], band: float) -> list[Tensor]:
    """Per window along one axis of a latent: the blend weight of each cell centre (in latent cells).
    A window owns [its start, the next window's start); across a band of `band` latent cells on each side
    of a shared edge its weight ramps linearly to 0 while the neighbour's ramps to 1, so at every centre
    the windows' weights sum to 1."""
    edges = [float(v) for v in starts[1:]]
    fades = []
    for lo, hi in zip([-math.inf] + edges, edges + [math.inf]):
        r = torch.ones_like(centres)
        if lo > -math.inf:
            r = r * (((centres - lo + band) / (2 * band)).clamp(0, 1) if band else (centres >= lo).double())
        if hi < math.inf:
            r = r * (((hi + band - centres) / (2 * band)).clamp(0, 1) if band else (centres < hi).double())
        fades.append(r)
    return fades

"""The crop recipe of the training data: which region of a photo becomes a sample, at which sizes.

Pure geometry on image sizes and a numpy Generator; no files, no pixels (data_sources.py applies the
geometry, data.py decides which photo and which generator):

    recipe = CropRecipe(input_size=256, out_min=256, out_max=512, aspect_ratios=(0.5, 1.0, 2.0))
    h, w = recipe.batch_hw(rng)               # one target size per batch
    crop = recipe.crop(4000, 3000, h, w, rng)  # a Crop, or Skip.SMALL for a photo too small for (h, w)
    crop.box, crop.target, crop.input          # (x0, y0, x1, y1) in the photo's pixels; (w, h); (S, S)
    flip = recipe.flip(rng)                    # drawn after the pixels load (see flip)

Targets are only ever DOWNsampled: the crop is at least the target's size in both directions.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class Skip(enum.Enum):
    """Why a photo gave no sample (DataStats counts each)."""
    CORRUPT = "corrupt"   # unreadable: corrupt, truncated, empty, not an image; never retried
    SMALL = "small"       # shorter side < min_side, or no crop holds the batch's target without upsampling


@dataclass(frozen=True)
class Crop:
    box: tuple[float, float, float, float]   # (x0, y0, x1, y1) in the (EXIF-oriented) photo's pixels
    target: tuple[int, int]                   # (w, h): the batch's output size
    input: tuple[int, int]                    # (S, S): the square the decoder's input is squashed to


def batch_size_hw(rng: np.random.Generator, out_min: int, out_max: int, aspect_ratios: Sequence[float],
                  multiple: int) -> tuple[int, int]:
    """(H, W) of one batch: area log-uniform in [out_min^2, out_max^2], W/H from the buckets, rounded to
    `multiple` (at least one multiple)."""
    ratio = float(aspect_ratios[rng.integers(len(aspect_ratios))])
    area = math.exp(rng.uniform(2 * math.log(out_min), 2 * math.log(out_max)))
    h = max(multiple, round(math.sqrt(area / ratio) / multiple) * multiple)
    w = max(multiple, round(math.sqrt(area * ratio) / multiple) * multiple)
    return h, w


@dataclass(frozen=True)
class CropRecipe:
    """Sizes per batch (paper, Training) and crops per sample. The order and number of draws from `rng` is
    part of the recipe: the loader's exact resume depends on it."""
    input_size: int
    out_min: int
    out_max: int
    aspect_ratios: tuple[float, ...]
    multiple: int = 8      # H and W are multiples of it
    min_side: int = 0      # photos whose shorter side is below it are never used

    def __post_init__(self):
        for name in ("input_size", "out_min", "out_max", "multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.out_min > self.out_max:
            raise ValueError(f"out_min ({self.out_min}) must be <= out_max ({self.out_max})")
        if not self.aspect_ratios or any(not (float(a) > 0) for a in self.aspect_ratios):
            raise ValueError(f"aspect_ratios must be positive numbers (W/H), got {self.aspect_ratios!r}")
        object.__setattr__(self, "aspect_ratios", tuple(float(a) for a in self.aspect_ratios))

    def batch_hw(self, rng: np.random.Generator) -> tuple[int, int]:
        """(H, W) of one batch; 2 draws."""
        return batch_size_hw(rng, self.out_min, self.out_max, self.aspect_ratios, self.multiple)

    def crop(self, iw: int, ih: int, h: int, w: int, rng: np.random.Generator) -> Crop | Skip:
        """A random crop of aspect w/h at a log-uniform scale of an iw x ih photo (3 draws), or Skip.SMALL
        (no draw) when the photo is too small for an (h, w) target without upsampling."""
        if min(iw, ih) < self.min_side:
            return Skip.SMALL
        ratio = w / h
        ch_max = min(ih, iw / ratio)   # largest crop height with this aspect ratio
        ch_min = float(h)              # crop height at which the target is the crop at 1:1 (no upsampling)
        if ch_max < ch_min:
            return Skip.SMALL
        ch = math.exp(rng.uniform(math.log(ch_min), math.log(ch_max)))  # scale: log-uniform
        ch = min(max(ch, ch_min), ch_max)  # exp(log(x)) can round past either end
        cw = min(ch * ratio, iw)
        x0, y0 = rng.uniform(0, iw - cw), rng.uniform(0, ih - ch)          # both >= 0 after the clamps
        return Crop((x0, y0, x0 + cw, y0 + ch), (w, h), (self.input_size, self.input_size))

    @staticmethod
    def flip(rng: np.random.Generator) -> bool:
        """Horizontal flip of target and input alike (1 draw). Drawn once the pixels have loaded, so a file
        that fails to decode consumes only the crop's draws."""
        return bool(rng.random() < 0.5)

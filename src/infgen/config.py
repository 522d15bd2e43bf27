"""Model configuration: one validated dataclass with named presets.

Every field has a docstring-like comment; `__post_init__` names the bad value. `from_dict` refuses unknown
keys so a typo in a config file is an error, not a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# Output pixel cap for decode(): 16K x 16K. Callers lift it explicitly with decode(..., max_pixels=N).
DEFAULT_MAX_PIXELS = 16384 * 16384


@dataclass
class InfGenConfig:
    latent_channels: int = 4          # C of the VAE latent
    scaling_factor: float = 0.18215   # diffusers convention: scaled = (raw - shift_factor) * scaling_factor
    shift_factor: float = 0.0
    hidden_size: int = 256            # D: width of latent and mask tokens
    num_heads: int = 4
    latent_depth: int = 2             # self-attention blocks over latent tokens (cost fixed by the latent)
    depth: int = 3                    # cross-attention + MLP blocks for mask tokens (cost linear in pixels)
    mlp_ratio: float = 4.0            # MLP width of latent blocks
    mask_mlp_ratio: float = 2.0       # MLP width of mask-token blocks (these run once per output token)
    attn_window: int = 0              # 0: mask tokens attend to all latent tokens (paper);
                                      # k (odd): to the k x k latent tokens around their position (ours)
    attn_window_falloff: str = "hann"  # hann: window weights fall smoothly to 0 at its edge, seam-free
                                      # (layers.Windows); none: a hard window that jumps at latent-cell
                                      # borders (the first bundled model, trained so)
    fourier_features: int = 128       # F: random Fourier features of the sphere point
    fourier_scale: float = 10.0       # std of the Gaussian Fourier matrix B
    inpe_hidden: int = 256            # hidden width of the INPE MLP
    scale_embed: bool = True          # give mask tokens log(output/latent scale), like LIIF's cell size
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16)  # conv decoder widths at 1/8, 1/4, 1/2, 1
    decoder_blocks: int = 1           # residual blocks per decoder level (not at full resolution)
    base_channels: tuple[int, ...] = ()  # () none; else widths of a base decoder of the raw latent at 1x
                                      # whose bicubic resize the mask tokens' pixels are added to (model.py)
    base_blocks: int = 1              # residual blocks per base decoder level
    base_tokens: bool = False         # mask tokens also see the 8x8 px of the resized base under them
    fourier_seed: int = 0             # seed of B; B is stored with the weights anyway

    def __post_init__(self) -> None:
        self.decoder_channels = tuple(self.decoder_channels)
        self.base_channels = tuple(self.base_channels)
        ints = ["latent_channels", "hidden_size", "num_heads", "latent_depth", "depth", "attn_window",
                "fourier_features", "inpe_hidden", "decoder_blocks", "base_blocks",
                "fourier_seed"]
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"InfGenConfig.{name} must be an int, got {value!r}")
        for name in ["latent_channels", "hidden_size", "num_heads", "depth", "fourier_features", "inpe_hidden"]:
            if getattr(self, name) < 1:
                raise ValueError(f"InfGenConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ["latent_depth", "decoder_blocks", "base_blocks"]:
            if getattr(self, name) < 0:
                raise ValueError(f"InfGenConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.attn_window < 0 or (self.attn_window and self.attn_window % 2 == 0):
            raise ValueError(f"attn_window must be 0 (global) or an odd size >= 1, got {self.attn_window}")
        if self.attn_window_falloff not in ("hann", "none"):
            raise ValueError(f"attn_window_falloff must be 'hann' or 'none', got {self.attn_window_falloff!r}")
        for name in ["scaling_factor", "shift_factor", "mlp_ratio", "mask_mlp_ratio", "fourier_scale"]:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise TypeError(f"InfGenConfig.{name} must be a finite number, got {value!r}")
        for name in ["scaling_factor", "mlp_ratio", "mask_mlp_ratio", "fourier_scale"]:
            if getattr(self, name) <= 0:
                raise ValueError(f"InfGenConfig.{name} must be > 0, got {getattr(self, name)}")
        if len(self.decoder_channels) != 4 or not all(isinstance(c, int) and c >= 1 for c in self.decoder_channels):
            raise ValueError("decoder_channels must be 4 positive ints (widths at 1/8, 1/4, 1/2 and full "
                             f"resolution), got {self.decoder_channels!r}")
        if len(self.base_channels) not in (0, 4) or not all(isinstance(c, int) and c >= 1 for c in self.base_channels):
            raise ValueError("base_channels must be () (no base decoder) or 4 positive ints (widths at 1/8, 1/4, "
                             f"1/2 and full resolution), got {self.base_channels!r}")
        if self.base_tokens and not self.base_channels:
            raise ValueError("base_tokens needs a base decoder (base_channels)")

    # -- presets -----------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "InfGenConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown InfGen preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    # -- (de)serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        d["base_channels"] = list(self.base_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InfGenConfig":
        if not isinstance(d, dict):
            raise TypeError(f"an InfGen config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown InfGen config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    # Unit tests: well under 1M parameters, exercises every code path (latent blocks, local window, decoder).
    "tiny": dict(hidden_size=32, num_heads=2, latent_depth=1, depth=2, fourier_features=16, inpe_hidden=32,
                 attn_window=3, decoder_channels=(32, 16, 16, 8), decoder_blocks=1),
    # The CPU default trained on this project's machines. Local cross-attention (3 x 3 window) and a thin
    # full-resolution decoder keep the per-pixel cost low on a 2-core CPU (see docs/benchmarks.md).
    "small": dict(hidden_size=256, num_heads=4, latent_depth=4, depth=3, mask_mlp_ratio=2.0, attn_window=3,
                  fourier_features=128, inpe_hidden=256, decoder_channels=(128, 64, 32, 16), decoder_blocks=1),
    # Paper scale for 4-channel SD-VAE latents: global cross-attention, 4 + 8 = 12 transformer blocks.
    "base": dict(hidden_size=768, num_heads=12, latent_depth=4, depth=8, mask_mlp_ratio=4.0, attn_window=0,
                 fourier_features=256, inpe_hidden=512, decoder_channels=(384, 256, 128, 64), decoder_blocks=2),
    # 16-channel latents of SD3 / FLUX VAEs (set scaling/shift to the VAE's values).
    "base-16ch": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, hidden_size=768,
                      num_heads=12, latent_depth=4, depth=8, mask_mlp_ratio=4.0, attn_window=0,
                      fourier_features=256, inpe_hidden=512, decoder_channels=(384, 256, 128, 64),
                      decoder_blocks=2),
}

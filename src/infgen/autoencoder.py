"""The project's own small KL autoencoder (f8, 4 or 16 latent channels): the embedded default's latent space.

No pretrained SD-VAE can be downloaded where this project is trained, so it ships its own. Like the InfGen
decoder it has no image-wide normalisation (no GroupNorm): encode/decode are local and tile exactly.
Checkpoints use the same config.json + model.safetensors format as InfGen.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_module, save_module
from .layers import ConvDecoder, ResBlock


@dataclass
class AutoencoderConfig:
    latent_channels: int = 4
    # Thin at full resolution, where a 2-core CPU spends most of its time (training here is CPU-bound).
    encoder_channels: tuple[int, ...] = (24, 48, 96, 128)   # widths at 1, 1/2, 1/4, 1/8
    decoder_channels: tuple[int, ...] = (128, 96, 48, 24)   # widths at 1/8, 1/4, 1/2, 1
    blocks: int = 1                                         # residual blocks per level
    decoder_blocks: int | None = None   # the decoder's, when it differs (a deeper decoder grown on a trained
                                        # encoder; None: `blocks`)
    scaling_factor: float = 1.0   # set after training to 1/std of the latents (diffusers convention)
    shift_factor: float = 0.0     # set after training to the latents' mean

    def __post_init__(self) -> None:
        self.encoder_channels = tuple(self.encoder_channels)
        self.decoder_channels = tuple(self.decoder_channels)
        for name in ("encoder_channels", "decoder_channels"):
            v = getattr(self, name)
            if len(v) != 4 or not all(isinstance(c, int) and c >= 1 for c in v):
                raise ValueError(f"AutoencoderConfig.{name} must be 4 positive ints, got {v!r}")
        if not isinstance(self.latent_channels, int) or self.latent_channels < 1:
            raise ValueError(f"AutoencoderConfig.latent_channels must be a positive int, got {self.latent_channels!r}")
        if not isinstance(self.blocks, int) or self.blocks < 0:
            raise ValueError(f"AutoencoderConfig.blocks must be an int >= 0, got {self.blocks!r}")
        if self.decoder_blocks is not None and (not isinstance(self.decoder_blocks, int) or self.decoder_blocks < 0):
            raise ValueError(f"AutoencoderConfig.decoder_blocks must be None or an int >= 0, got {self.decoder_blocks!r}")
        for name in ("scaling_factor", "shift_factor"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"AutoencoderConfig.{name} must be a finite number, got {v!r}")
        if self.scaling_factor <= 0:
            raise ValueError(f"AutoencoderConfig.scaling_factor must be > 0, got {self.scaling_factor}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "AutoencoderConfig":
        presets = {
            "tiny": dict(encoder_channels=(8, 16, 16, 16), decoder_channels=(16, 16, 16, 8)),
            "small": {},
            # 16 latent channels at f8, as SD3 / FLUX: 16 numbers per 192 pixel values instead of 4.
            "small-16ch": dict(latent_channels=16),
            "tiny-16ch": dict(latent_channels=16, encoder_channels=(8, 16, 16, 16), decoder_channels=(16, 16, 16, 8)),
        }
        if name not in presets:
            raise ValueError(f"unknown autoencoder preset {name!r}; expected one of {sorted(presets)}")
        return cls.from_dict({**presets[name], **overrides})

    @property
    def decoder_depth(self) -> int:
        """Residual blocks per level of the decoder."""
        return self.blocks if self.decoder_blocks is None else self.decoder_blocks

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown autoencoder config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


class Encoder(nn.Module):
    def __init__(self, channels: tuple[int, ...], blocks: int, latent_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        for i in range(3):
            self.levels.append(nn.Sequential(*[ResBlock(channels[i]) for _ in range(blocks)],
                                             nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1)))
        self.mid = nn.Sequential(*[ResBlock(channels[3]) for _ in range(blocks)])
        self.conv_out = nn.Conv2d(channels[3], 2 * latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:                                   # (B, 3, H, W)
        x = self.conv_in(x.contiguous(memory_format=torch.channels_last))     # see ConvDecoder.forward
        for level in self.levels:
            x = level(x)                                                      # halves H, W
        return self.conv_out(F.silu(self.mid(x)))                             # (B, 2C, H/8, W/8)


class KLAutoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder_channels, config.blocks, config.latent_channels)
        self.decoder = ConvDecoder(config.latent_channels, config.decoder_channels, config.decoder_depth)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, C, ceil(H/8), ceil(W/8))."""
        H, W = x.shape[-2:]
        pad_h, pad_w = -H % 8, -W % 8
        if pad_h or pad_w:  # replicate-pad to a multiple of 8; decode then crops
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """Raw latents (B, C, h, w) -> images (B, 3, 8h, 8w), unclamped."""
        return self.decoder(z)

    def forward(self, x: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self.decode(z)[..., : x.shape[-2], : x.shape[-1]], mean, logvar

    @staticmethod
    def kl_loss(mean: Tensor, logvar: Tensor) -> Tensor:
        """KL(q(z|x) || N(0, I)), summed over latent dims, averaged over the batch."""
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()

    # -- checkpoints (same format as InfGen) ------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        save_module(self, "KLAutoencoder", self.config.to_dict(), path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "KLAutoencoder":
        return load_module(path, "KLAutoencoder", lambda d: cls(AutoencoderConfig.from_dict(d)), device)

"""Latent codecs: the frozen encoder (and native decoder) of a latent space, behind one small interface.

    codec.encode(images)  (B, 3, H, W) in [-1, 1] -> raw latents (B, C, ceil(H/8), ceil(W/8))
    codec.decode(latents) raw latents (B, C, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]
    codec.latent_channels, codec.scaling_factor, codec.shift_factor

"Raw" latents are what the VAE encoder produces; diffusion models work on scaled latents
(raw - shift_factor) * scaling_factor and pipelines unscale before decoding (diffusers convention).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .autoencoder import KLAutoencoder
from .checkpoint import CONFIG_NAME, CheckpointError, read_json


class LatentCodec(nn.Module):
    latent_channels: int
    scaling_factor: float
    shift_factor: float

    def encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def save_pretrained(self, path) -> None:
        raise NotImplementedError


class AutoencoderCodec(LatentCodec):
    """The project's own KLAutoencoder. Posterior mean by default (deterministic latents)."""

    def __init__(self, autoencoder: KLAutoencoder, sample: bool = False):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.sample = sample
        cfg = autoencoder.config
        self.latent_channels, self.scaling_factor, self.shift_factor = cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        mean, logvar = self.autoencoder.encode(images.to(self.device, self.dtype))
        return mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.sample else mean

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.autoencoder.decode(latents.to(self.device, self.dtype)).clamp(-1, 1)

    def save_pretrained(self, path) -> None:
        self.autoencoder.save_pretrained(path)


class DiffusersVAECodec(LatentCodec):
    """A diffusers AutoencoderKL (SD1.x / SDXL / SD3 / FLUX VAEs). The encoder is frozen."""

    def __init__(self, vae, sample: bool = False):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.sample = sample
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        return (dist.sample() if self.sample else dist.mean).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents.to(self.device, self.vae.dtype)).sample.float().clamp(-1, 1)

    def save_pretrained(self, path) -> None:
        self.vae.save_pretrained(path)


def looks_local(spec: str | Path) -> bool:
    """True unless `spec` can only be a hub id ("owner/name" or "owner/name:subfolder") whose first part is
    not a folder here: "runs/autoencoder/final", "./x", "/abs", "~/x" and "checkpoints/ae" (when checkpoints/
    exists) are local paths, and a missing local path is an error, never a hub request."""
    text = str(spec)
    repo = text.partition(":")[0]
    if text.startswith((".", "/", "~")) or repo.count("/") != 1 or "\\" in text:
        return True
    return Path(repo.split("/")[0]).is_dir()


def load_codec(spec: str | Path, device: str | torch.device = "cpu", sample: bool = False) -> LatentCodec:
    """Load a codec from a local directory or a hub id.

    - a directory saved by KLAutoencoder.save_pretrained -> AutoencoderCodec
    - a diffusers AutoencoderKL directory, or a hub id such as "stabilityai/sd-vae-ft-ema";
      "repo_id:subfolder" selects a subfolder ("stabilityai/stable-diffusion-3-medium-diffusers:vae").
    """
    spec = str(spec)
    path = Path(spec)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        name = read_json(path / CONFIG_NAME).get("_class_name")
        if name == "KLAutoencoder":
            return AutoencoderCodec(KLAutoencoder.from_pretrained(path, device=device), sample=sample)
        if name != "AutoencoderKL":
            raise CheckpointError(f"{path} holds a {name or 'unknown'} checkpoint; expected a KLAutoencoder "
                                  "or a diffusers AutoencoderKL directory")
    elif path.exists():
        raise CheckpointError(f"{path} is not a codec checkpoint directory (no {CONFIG_NAME})")
    elif looks_local(spec):
        raise CheckpointError(f"codec {spec}: no such directory (a local path; hub ids look like owner/name)")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("loading a diffusers VAE needs the `diffusers` extra: pip install 'infgen[diffusers]'") from None
    repo, _, subfolder = spec.partition(":") if not path.exists() else (spec, "", "")
    # use_safetensors: a .bin (pickle) in the folder is refused, never unpickled
    vae = AutoencoderKL.from_pretrained(repo, subfolder=subfolder or None, use_safetensors=True)
    return DiffusersVAECodec(vae.to(device), sample=sample)

"""InfGenVAE: an InfGen decoder as a drop-in diffusers VAE, so any pipeline renders at any output size.

    from infgen.integrations.diffusers import InfGenVAE
    pipe.vae = InfGenVAE.from_pretrained()             # bundled default; or a saved InfGenVAE dir / hub id
    with pipe.vae.output_size(1080, 1920):             # the pipeline's height/width pick the LATENT size
        image = pipe(...).images[0]                    # 1920 x 1080
    z = pipe(..., output_type="latent").images         # or decode yourself:
    x = pipe.vae.decode(z / pipe.vae.config.scaling_factor, height=2160, width=3840).sample

The diffusers contract (ConsistencyDecoderVAE and AutoencoderTiny register the same keys):
- config: latent_channels, block_out_channels (length 4, so pipelines compute vae_scale_factor 8),
  scaling_factor, shift_factor, latents_mean/std (None), force_upcast (False: InfGen is bf16/fp16 safe);
  plus what rebuilds the parts: `infgen_config`, `codec_config` (None or {"type", "config"}), `bundle_info`.
- decode(z) takes UNSCALED latents, as pipelines pass them, and goes through InfGenPipeline.decode, the
  project's one decode path (window decoding and extrapolation included).
- encode(x) delegates to the frozen encoder of the latent space (img2img), like ConsistencyDecoderVAE.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import Tensor

try:
    from diffusers import AutoencoderKL
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.utils.accelerate_utils import apply_forward_hook
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("infgen.integrations.diffusers needs the `diffusers` extra: "
                      "pip install 'infgen[diffusers]'") from e

from .. import pipeline as _pipeline
from ..autoencoder import AutoencoderConfig, KLAutoencoder
from ..codecs import AutoencoderCodec, DiffusersVAECodec, LatentCodec
from ..config import InfGenConfig
from ..model import InfGen, check_size
from ..pipeline import BundleInfo, InfGenPipeline

_CODEC_TYPES = ("KLAutoencoder", "AutoencoderKL")


class InfGenVAE(ModelMixin, ConfigMixin):
    """An InfGen decoder (+ optionally the frozen encoder of its latent space) behind diffusers' VAE API.

    Build it with `from_pretrained` (a saved InfGenVAE, or no argument for the bundled default),
    `from_bundle` (an infgen bundle directory) or `from_infgen` (objects in memory)."""

    @register_to_config
    def __init__(
        self,
        infgen_config: dict | None = None,       # InfGenConfig.to_dict(); None: the default InfGenConfig
        codec_config: dict | None = None,        # {"type": "KLAutoencoder" | "AutoencoderKL", "config": {...}}
        bundle_info: dict | None = None,         # BundleInfo fields: when windows / extrapolation kick in
        latent_channels: int | None = None,      # the keys below are derived from infgen_config when None
        block_out_channels: list[int] | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        force_upcast: bool = False,
    ):
        super().__init__()
        cfg = InfGenConfig() if infgen_config is None else InfGenConfig.from_dict(dict(infgen_config))
        info = BundleInfo() if bundle_info is None else BundleInfo.from_dict(dict(bundle_info))
        # Pipelines unscale with config.scaling_factor / shift_factor and InfGen rescales with its own:
        # the two must describe the same latent space.
        for name, given, own in (("latent_channels", latent_channels, cfg.latent_channels),
                                 ("scaling_factor", scaling_factor, cfg.scaling_factor),
                                 ("shift_factor", shift_factor, cfg.shift_factor)):
            if given is not None and given != own:
                raise ValueError(f"InfGenVAE {name}={given!r} disagrees with infgen_config's {name}={own!r}; "
                                 "they must describe the same latent space")
        if block_out_channels is not None and len(block_out_channels) != 4:
            raise ValueError(f"block_out_channels must have 4 entries (pipelines derive vae_scale_factor = "
                             f"2 ** (len - 1) = 8 from it), got {block_out_channels!r}")
        self.infgen = InfGen(cfg)
        self.codec = _build_codec(codec_config)
        if self.codec is not None and self.codec.latent_channels != cfg.latent_channels:
            raise ValueError(f"codec has {self.codec.latent_channels} latent channels, infgen_config expects "
                             f"{cfg.latent_channels}")
        self.info = info
        self._output_size: tuple[int, int] | None = None
        self.register_to_config(
            infgen_config=cfg.to_dict(),
            bundle_info=dataclasses.asdict(info),
            latent_channels=cfg.latent_channels,
            # InfGen's decoder widths, highest resolution first as diffusers lists them
            block_out_channels=list(block_out_channels or reversed(cfg.decoder_channels)),
            scaling_factor=float(cfg.scaling_factor),
            shift_factor=float(cfg.shift_factor),  # a float, never None: SD3/FLUX pipelines add it
        )

    # -- constructors -----------------------------------------------------------------------------------
    @classmethod
    def from_infgen(cls, model: InfGen, codec=None, info: BundleInfo | None = None) -> "InfGenVAE":
        """Wrap objects in memory (their tensors are shared, not copied).

        codec: None, a LatentCodec (AutoencoderCodec / DiffusersVAECodec), a KLAutoencoder or a diffusers
        AutoencoderKL: the frozen encoder that encode() and the extrapolation loop use."""
        if not isinstance(model, InfGen):
            raise TypeError(f"from_infgen expects an InfGen model, got {type(model).__name__}")
        if info is not None and not isinstance(info, BundleInfo):
            raise TypeError(f"info must be a BundleInfo or None, got {type(info).__name__}")
        codec_module, codec_config = _codec_spec(codec)
        with torch.device("meta"):  # build the skeleton without allocating, then adopt the given tensors
            vae = cls(infgen_config=model.config.to_dict(), codec_config=codec_config,
                      bundle_info=dataclasses.asdict(info or BundleInfo()))
        vae.infgen.load_state_dict(model.state_dict(), strict=True, assign=True)
        if codec_module is not None:
            vae.codec.load_state_dict(codec_module.state_dict(), strict=True, assign=True)
        meta = [n for n, t in [*vae.named_parameters(), *vae.named_buffers()] if t.is_meta]
        assert not meta, f"tensors left on the meta device: {meta[:5]}"
        return vae.eval()

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, device: str | torch.device = "cpu",
                    torch_dtype: torch.dtype | None = None) -> "InfGenVAE":
        """An infgen bundle (infgen/, codec/, bundle.json): None for the bundled default, a directory or a hub id."""
        path = _pipeline.DEFAULT_BUNDLE if path is None else path  # read now, so tests can point it elsewhere
        pipe = InfGenPipeline.from_pretrained(path, device=device)
        vae = cls.from_infgen(pipe.model, pipe.codec, pipe.info)
        # nn.Module.to: ModelMixin.to warns about fp32-pinned modules even when there are none
        return torch.nn.Module.to(vae, dtype=torch_dtype) if torch_dtype is not None else vae

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = None, **kwargs) -> "InfGenVAE":
        """No argument: the project's bundled default. A saved InfGenVAE directory or hub id: diffusers'
        own loader (any of its kwargs). A local infgen bundle directory: `from_bundle`."""
        path = pretrained_model_name_or_path
        if path is None or _is_local_bundle(path):
            extra = sorted(set(kwargs) - {"torch_dtype"})
            if extra:
                raise TypeError(f"loading an infgen bundle accepts only torch_dtype, got {extra}")
            return cls.from_bundle(path, torch_dtype=kwargs.get("torch_dtype"))
        return super().from_pretrained(path, **kwargs)

    # -- output size ------------------------------------------------------------------------------------
    def set_output_size(self, height: int | None, width: int | None = None) -> None:
        """Size of every decode that does not pass height/width; None resets to 8x the latent."""
        if height is None and width is None:
            self._output_size = None
            return
        if height is None or width is None:
            raise ValueError(f"set_output_size needs both height and width (or None), got {height!r}, {width!r}")
        self._output_size = check_size(height, width, max_pixels=None)

    @contextlib.contextmanager
    def output_size(self, height: int, width: int):
        """`with vae.output_size(H, W): pipe(...)`: pipelines pick the latent size from their own
        height/width and call decode(latents) with no size; this sets the decoded size meanwhile."""
        previous = self._output_size
        self.set_output_size(height, width)
        try:
            yield self
        finally:
            self._output_size = previous

    # -- the VAE API ------------------------------------------------------------------------------------
    def _resolve_size(self, z: Tensor, height: int | None, width: int | None) -> tuple[int, int]:
        if (height is None) != (width is None):
            raise ValueError(f"pass both height and width, or neither; got height={height!r}, width={width!r}")
        if height is not None:
            return height, width
        if self._output_size is not None:
            return self._output_size
        return 8 * z.shape[-2], 8 * z.shape[-1]

    @apply_forward_hook
    def decode(self, z: Tensor, return_dict: bool = True, generator: torch.Generator | None = None, *,
               height: int | None = None, width: int | None = None,
               content: tuple[int, int] | None = None) -> DecoderOutput | tuple[Tensor]:
        """Unscaled latents (B, C, h, w) -> DecoderOutput(sample=(B, 3, H, W) in [-1, 1]).

        Size: height/width if given, else the one set by `output_size` / `set_output_size`, else (8h, 8w).
        content: see InfGenPipeline.decode (the px of a padded image the latents were encoded from).
        `generator` is accepted for pipelines and ignored: InfGen decoding is deterministic."""
        height, width = self._resolve_size(z, height, width)
        sample = InfGenPipeline(self.infgen, self.codec, self.info).decode(z, height, width, content=content)
        sample = sample.clone()  # out of inference mode, so callers may modify it in place
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    @apply_forward_hook
    def encode(self, x: Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """Images (B, 3, H, W) in [-1, 1] -> AutoencoderKLOutput(latent_dist) of unscaled latents."""
        if self.codec is None:
            raise ValueError("this InfGenVAE has no encoder (codec_config is None), so it can decode but not "
                             "encode; build it with from_infgen(model, codec=...) or from a bundle with a codec/")
        if isinstance(self.codec, DiffusersVAECodec):
            return self.codec.vae.encode(x.to(self.codec.vae.dtype), return_dict=return_dict)
        ae = self.codec.autoencoder
        mean, logvar = ae.encode(x.to(device=self.codec.device, dtype=next(ae.parameters()).dtype))
        dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))  # (B, 2C, h, w)
        if not return_dict:
            return (dist,)
        return AutoencoderKLOutput(latent_dist=dist)

    def forward(self, sample: Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None) -> DecoderOutput | tuple[Tensor]:
        """Encode and decode at the input's size (a reconstruction, as AutoencoderKL.forward)."""
        dist = self.encode(sample).latent_dist
        z = dist.sample(generator=generator) if sample_posterior else dist.mode()
        height, width = sample.shape[-2:]
        # the project's autoencoder replicate-pads images to a multiple of 8: decode the image, not the padding
        content = (height, width) if isinstance(self.codec, AutoencoderCodec) else None
        return self.decode(z, return_dict=return_dict, height=height, width=width, content=content)


def _build_codec(spec: dict | None) -> LatentCodec | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) != {"type", "config"} or spec["type"] not in _CODEC_TYPES:
        raise ValueError(f"codec_config must be None or {{'type': one of {list(_CODEC_TYPES)}, 'config': {{...}}}}, "
                         f"got {spec!r}")
    if spec["type"] == "KLAutoencoder":
        return AutoencoderCodec(KLAutoencoder(AutoencoderConfig.from_dict(dict(spec["config"]))))
    return DiffusersVAECodec(AutoencoderKL.from_config(dict(spec["config"])))


def _codec_spec(codec) -> tuple[torch.nn.Module | None, dict | None]:
    """(module whose state_dict fills InfGenVAE.codec, codec_config) for any supported codec object."""
    if codec is None:
        return None, None
    if isinstance(codec, KLAutoencoder):
        codec = AutoencoderCodec(codec)
    elif isinstance(codec, AutoencoderKL):
        codec = DiffusersVAECodec(codec)
    if isinstance(codec, AutoencoderCodec):
        return codec, {"type": "KLAutoencoder", "config": codec.autoencoder.config.to_dict()}
    if isinstance(codec, DiffusersVAECodec):
        cfg = {k: v for k, v in codec.vae.config.items() if not k.startswith("_")}
        return codec, {"type": "AutoencoderKL", "config": cfg}
    raise TypeError(f"codec must be None, a KLAutoencoder, a diffusers AutoencoderKL or an infgen LatentCodec "
                    f"wrapping one, got {type(codec).__name__}")


def _is_local_bundle(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "infgen").is_dir() and not (p / "config.json").is_file()

"""The `infgen train` configuration: dataclasses loaded from YAML plus `--set key=value` overrides.

Unknown keys and wrongly typed values are errors that name the key. `check_paths` fails early, in one line,
on an input path that does not exist. (The InfGen model's own configuration is config.InfGenConfig;
`model.preset` / `model.overrides` here select and adjust it.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .perceptual import BACKENDS


@dataclass
class ModelConfig:
    preset: str = "small"            # InfGenConfig / AutoencoderConfig preset name
    overrides: dict = field(default_factory=dict)  # fields of that config, e.g. {depth: 4}
    init_from: str | None = None     # a save_pretrained directory (e.g. stage 1's final/): its architecture
                                     # and weights replace preset/overrides (stage 2 fine-tuning)
    warm_start: str | None = None    # a save_pretrained directory of another architecture (e.g. trained for
                                     # 4-channel latents): every tensor whose name and shape match is copied,
                                     # the rest keep their initialisation (both lists are printed)
    base_from_codec: bool = False    # infgen: a base decoder copied from the codec's (a KLAutoencoder), so
                                     # training starts at codec + bicubic (InfGen.init_base_from)
    keep_residual: bool = False      # infgen, with base_from_codec and warm_start: keep the warm start's
                                     # residual (the tokens' last layer) instead of zeroing it
    freeze_base: bool = False        # infgen: the base decoder is not trained (it stays the codec's decoder,
                                     # exactly; the tokens learn only the residual)
    freeze_encoder: bool = False     # autoencoder: train the decoder only, so the latent space (and every
                                     # InfGen trained on it) stays the checkpoint's


@dataclass
class DataConfig:
    source: str | None = None        # folder of images, or webdataset shards 'shards/{000000..000099}.tar'
    root: str | None = None          # passed through to make_loader
    preview_source: str | None = None  # images for preview grids / autoencoder latent statistics (default: source)
    val_source: str | None = None    # split list / folder for `val_psnr` every train.eval_every steps: the
                                     # `infgen eval` protocol (centre crops, val_input_size^2 inputs) at 1x for
                                     # the autoencoder, at 2x for InfGen
    val_input_size: int = 256
    input_size: int = 256            # side of the square crop the codec encodes
    out_min: int = 256               # target sizes: both sides in [out_min, out_max] (InfGen only)
    out_max: int = 1024
    aspect_ratios: list = field(default_factory=lambda: [1.0])  # width / height of the random crops
    batch_size: int = 4              # per process
    num_workers: int = 2
    cache: str | None = None         # folder of decoded photo pyramids (photo_cache.py), built on first use:
                                     # the loader stops decoding 2-6K-pixel JPEGs at every sample

    def __post_init__(self):
        for name in ("input_size", "out_min", "out_max", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.out_min > self.out_max:
            raise ValueError(f"data.out_min ({self.out_min}) must be <= data.out_max ({self.out_max})")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not self.aspect_ratios or not all(isinstance(a, (int, float)) and a > 0 for a in self.aspect_ratios):
            raise ValueError(f"data.aspect_ratios must be a non-empty list of positive numbers, got {self.aspect_ratios!r}")
        self.aspect_ratios = [float(a) for a in self.aspect_ratios]


@dataclass
class LossConfig:
    perceptual: str = "vgg19"        # vgg19 (offline VGG19 feature distance) | lpips (optional package) | none
    perceptual_weight: float = 0.1   # lambda_P (paper: 0.1 with LPIPS)
    perceptual_layers: list = field(default_factory=list)  # vgg19 taps; [] = relu1_2 .. relu5_4 (5 layers).
                                     # VGG19 dominates a CPU step: ~12.7 GFLOP forward per 128^2 image with
                                     # all five, ~4.9 up to block3_relu2
    gan_weight: float = 0.1          # lambda_G (paper: 0.1); 0 disables the discriminator entirely
    gan_start: int = 0               # generator GAN term and discriminator updates start at this step
    max_d_weight: float = 1e4        # clamp of the adaptive weight
    perceptual_samples: int = 0      # perceptual term on the first N samples of each batch only (0: all):
                                     # the batch is shuffled, so this is an unbiased, cheaper estimate
    kl_weight: float = 1e-6          # autoencoder only
    disc_layers: int = 3             # PatchGAN depth (3: ~70 px patches)
    disc_channels: int = 64
    disc_norm: str = "group"         # group | none (no BatchNorm: DDP-safe)

    def __post_init__(self):
        if self.perceptual not in BACKENDS:
            raise ValueError(f"loss.perceptual must be one of {list(BACKENDS)}, got {self.perceptual!r}")
        for name in ("perceptual_weight", "gan_weight", "kl_weight", "gan_start", "max_d_weight", "perceptual_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_norm not in ("group", "none"):
            raise ValueError(f"loss.disc_norm must be 'group' or 'none', got {self.disc_norm!r}")


@dataclass
class OptimConfig:
    lr: float = 2e-4                 # peak learning rate (paper: cosine 2e-4 -> 1e-5)
    min_lr: float = 1e-5
    warmup_steps: int = 1000         # linear warm-up from 0
    decay_steps: int | None = None   # cosine horizon; None: train.max_steps
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.01       # on matrices and conv kernels only (nanoGPT)
    grad_clip: float = 1.0           # max global grad norm; 0 disables
    disc_lr: float | None = None     # discriminator (constant); None: lr
    ema_decay: float = 0.999         # ramps up as min(decay, (1 + step) / (10 + step))

    def __post_init__(self):
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim needs lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or (self.decay_steps is not None and self.decay_steps < 1):
            raise ValueError(f"optim.warmup_steps must be >= 0 and decay_steps >= 1, got {self.warmup_steps}, {self.decay_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class LoopConfig:
    max_steps: int = 1000
    log_every: int = 10
    ckpt_every: int = 500
    sample_every: int = 500          # preview grid; 0 disables (one is still written at the end)
    keep_checkpoints: int = 3        # newest N kept
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"    # auto (bf16 where it is fast: GPUs, CPUs with AVX512-BF16/AMX) | no | bf16 | fp16
    cpu: bool = False                # force the CPU even if a GPU is present
    cpu_threads: int = 0             # torch intra-op threads per process; 0 keeps torch's default
    preview_sizes: list = field(default_factory=list)  # [[h, w], ...]; [] derives them from data.*
    stats_batches: int = 4           # preview batches for the autoencoder's latent mean / std
    eval_every: int = 0              # val_psnr on data.val_source every N steps (0: never), in metrics.jsonl
    debug_rank_weights: bool = False  # tests: every rank writes its final weights to debug/rank<r>.safetensors

    def __post_init__(self):
        if self.max_steps < 0 or self.log_every < 1 or self.ckpt_every < 1 or self.sample_every < 0 or self.eval_every < 0:
            raise ValueError("train.max_steps must be >= 0, log_every and ckpt_every >= 1, sample_every and "
                             "eval_every >= 0")
        if self.cpu_threads < 0:
            raise ValueError(f"train.cpu_threads must be >= 0, got {self.cpu_threads}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        for s in self.preview_sizes:
            if not (isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)):
                raise ValueError(f"train.preview_sizes entries must be [height, width], got {s!r}")


@dataclass
class TrainConfig:
    kind: str = "infgen"             # infgen | autoencoder
    output: str = "runs/train"
    seed: int = 0
    codec: str | None = None         # infgen: frozen codec (autoencoder dir, diffusers VAE dir or hub id)
    render_cells: int = 16           # infgen: render a random render_cells^2 region of 8x8 cells per step
    render_halo: bool = True         # infgen: decode the region with the conv decoder's halo (exactly the
                                     # crop of a full decode); false: without (zero padding at the region's
                                     # edge, as patch-trained SR networks): ~3x fewer pixels decoded per
                                     # supervised pixel at 16 cells
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        if self.kind not in ("infgen", "autoencoder"):
            raise ValueError(f"kind must be 'infgen' or 'autoencoder', got {self.kind!r}")
        if self.render_cells < 1:
            raise ValueError(f"render_cells must be >= 1, got {self.render_cells}")
        if self.model.init_from and self.model.warm_start:
            raise ValueError("model.init_from and model.warm_start exclude each other; use one")
        if self.model.init_from and self.model.overrides:
            raise ValueError("model.init_from takes the architecture from that checkpoint; remove model.overrides")
        if self.model.base_from_codec and (self.kind != "infgen" or self.model.init_from):
            raise ValueError("model.base_from_codec starts a new kind: infgen model (it cannot follow init_from)")
        if self.model.keep_residual and not (self.model.base_from_codec and self.model.warm_start):
            raise ValueError("model.keep_residual keeps a warm start's residual over a new base: it needs "
                             "model.base_from_codec and model.warm_start")
        if self.model.freeze_base and self.kind != "infgen":
            raise ValueError("model.freeze_base is for kind: infgen (its base decoder); an autoencoder has "
                             "model.freeze_encoder")
        if self.model.freeze_encoder and (self.kind != "autoencoder" or not (self.model.init_from or self.model.warm_start)):
            raise ValueError("model.freeze_encoder keeps a trained autoencoder's encoder: it needs kind: "
                             "autoencoder and model.init_from or model.warm_start")
        if self.kind == "autoencoder" and self.train.gradient_checkpointing:
            raise ValueError("train.gradient_checkpointing is implemented for kind: infgen only")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _SetText(str):
    """A `--set` value as typed. It becomes YAML (numbers, lists, null) for typed keys but stays verbatim
    for string keys, where YAML 1.1 would turn `no`, `off` or `yes` into booleans."""

    def resolve(self, tp):
        import yaml
        parsed = yaml.safe_load(str(self)) if self else ""
        wants_str = tp is str or str in typing.get_args(tp)
        return str(self) if wants_str and parsed is not None else parsed


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; ints pass as floats, '2e-4' strings (YAML 1.1) as floats."""
    if isinstance(value, _SetText):
        value = value.resolve(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(tp)
    if tp is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif (origin or tp) is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif (origin or tp) is dict:
        if isinstance(value, dict):
            return {k: v.resolve(object) if isinstance(v, _SetText) else v for k, v in value.items()}
    name = getattr(tp, "__name__", str(tp))
    raise ValueError(f"config key {key!r} must be {name}, got {value!r}")


def _build(cls, raw, prefix: str = ""):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '(top level)'!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ValueError(f"unknown config key {prefix + str(key)!r}; expected one of {names}")
        tp = hints[key]
        kwargs[key] = _build(tp, value, f"{prefix}{key}.") if dataclasses.is_dataclass(tp) else _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def parse_set(item: str) -> tuple[list[str], object]:
    """'optim.lr=1e-4' -> (['optim', 'lr'], '1e-4'); the text is read against the key's type in _coerce."""
    key, sep, value = item.partition("=")
    if not sep or not key or not all(key.split(".")):
        raise ValueError(f"--set expects key.sub=value, got {item!r}")
    return key.split("."), _SetText(value)


def load_config(path: str | Path | None = None, sets: list[str] = (), **top: object) -> TrainConfig:
    """Read a YAML config, apply `--set` overrides, then the CLI shortcuts in `top` (dotted keys -> values)."""
    import yaml
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise OSError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a YAML mapping, got {type(raw).__name__}")
    items = [parse_set(s) for s in sets] + [(k.split("."), v) for k, v in top.items() if v is not None]
    for keys, value in items:
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise ValueError(f"--set {'.'.join(keys)}: {k!r} is not a section")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return _build(TrainConfig, raw)


# ----------------------------------------------------------------------------------------------------------
# Input paths, checked before any work.


def check_paths(cfg: TrainConfig) -> None:
    """Fail in one line, before any work, on a local input path that does not exist, naming the config whose
    run makes it; no codec given (kind: infgen) means the bundled default's, announced."""
    from .codecs import looks_local
    if cfg.kind == "infgen" and not cfg.codec:
        from .pipeline import DEFAULT_BUNDLE
        cfg.codec = str(DEFAULT_BUNDLE / "codec")
        print(f"infgen train: no codec given: using the bundled default's ({cfg.codec})", file=sys.stderr)
    paths = {"codec": cfg.codec, "model.init_from": cfg.model.init_from, "model.warm_start": cfg.model.warm_start}
    for key, value in paths.items():
        if value is None or Path(value).exists() or (key == "codec" and not looks_local(value)):
            continue
        makers = [f for d in config_dirs() for f in sorted(d.glob("*.yaml")) if run_export(f) == Path(value)]
        how = (f"it is the export of `infgen train --config {makers[0]}`: run that first" if makers
               else "give an existing directory")
        raise ValueError(f"{key} {value} does not exist; {how}")


def config_dirs() -> list[Path]:
    """configs/ here and in the source checkout (an editable install), where the shipped configs live."""
    dirs = [Path("configs"), Path(__file__).resolve().parents[2] / "configs"]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d.resolve() not in {e.resolve() for e in dirs[:i]}]


def run_export(config: Path) -> Path | None:
    """OUTPUT/final of a training config (None if it is not one)."""
    import yaml
    try:
        raw = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return Path(raw["output"]) / "final" if isinstance(raw, dict) and raw.get("output") else None


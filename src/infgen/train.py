"""`infgen train`: train InfGen (or the project's small KL autoencoder) from one CPU to many GPUs.

    infgen train --config configs/cpu-small.yaml --data data/photos [--output DIR] [--max-steps N]
                 [--resume] [--set optim.lr=1e-4 --set data.batch_size=8 ...]
    accelerate launch --multi_gpu --num_processes 8 -m infgen train --config configs/paper-stage1.yaml ...

One function, `train`, holds the whole loop in the spirit of DiT's and nanoGPT's train.py: accelerate
(DDP, bf16 autocast on GPU), AdamW with linear warm-up + cosine decay, EMA weights (the exported model),
gradient clipping, L1 + perceptual + PatchGAN hinge losses (losses.py), atomic checkpoints that resume
exactly, SIGTERM/SIGINT -> finish the step, checkpoint, exit 0.

Output directory:
    config.yaml            the resolved configuration of the run
    metrics.jsonl          one JSON object per log_every steps (losses, lr, s/step, data stats)
    samples/step-*.png     preview grids (every sample_every steps)
    checkpoints/step-*/    model/ema/discriminator .safetensors, optimizer .pt (tensors only, loaded with
                           weights_only=True), rng-rank*.json, trainer.json (step, config)
    final/                 the EMA model, save_pretrained format (InfGen or KLAutoencoder)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .autoencoder import AutoencoderConfig, KLAutoencoder
from .checkpoint import (CheckpointError, atomic_save_safetensors, atomic_write_bytes, check_state_dict,
                         load_safetensors, read_json)
from .config import InfGenConfig
from .images import one_line, tensor_to_pil
from .losses import NLayerDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, reconstruction_loss
from .model import InfGen
from .perceptual import BACKENDS, PerceptualLoss

# ----------------------------------------------------------------------------------------------------------
# Configuration: dataclasses, loaded from YAML; unknown keys are errors that name the key.


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
# Small helpers: schedule, EMA, RNG state, checkpoints, previews.


def lr_at(step: int, o: OptimConfig, max_steps: int) -> float:
    """Linear warm-up to o.lr, then cosine decay to o.min_lr at the horizon, then constant (nanoGPT)."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    horizon = o.decay_steps or max_steps
    t = min((step - o.warmup_steps) / max(horizon - o.warmup_steps, 1), 1.0)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * t)) * (o.lr - o.min_lr)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_p = [p for p in ema.parameters()]
    model_p = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_p)]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *[v.item() if hasattr(v, "item") else v for v in np_state[2:]]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


@contextlib.contextmanager
def preserved_rng():
    """Previews and exports must not perturb the training RNG streams (resume reproducibility)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory appears under its final name only when complete)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_torch_tensors(obj: dict, path: Path) -> None:
    """torch.save for optimizer state only (nested dicts of tensors and numbers: weights_only-loadable),
    written atomically and fsynced like every other checkpoint file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torch_tensors(path: Path, device) -> dict:
    """An optimizer state saved by save_torch_tensors; a one-line CheckpointError when it is unreadable."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a pickle with objects: never a traceback
        raise CheckpointError(f"{path} is not a readable optimizer state ({one_line(e, 160)})") from None


def read_checkpoint(ckpt: Path, kind: str, with_disc: bool, device) -> dict:
    """Every file a resume needs, read once: {"step", "model", "ema", "optimizer"} and, with a discriminator
    whose files are there, "discriminator" / "disc_optimizer". A one-line CheckpointError names the first
    bad file."""
    meta = read_json(ckpt / "trainer.json")
    if meta.get("kind") != kind:
        raise CheckpointError(f"{ckpt} is a kind: {meta.get('kind')} checkpoint, the config says kind: {kind}")
    if not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{ckpt / 'trainer.json'} has no integer step")
    state = {"step": meta["step"], "model": load_safetensors(ckpt / "model.safetensors"),
             "ema": load_safetensors(ckpt / "ema.safetensors"),
             "optimizer": load_torch_tensors(ckpt / "optimizer.pt", device)}
    if with_disc and (ckpt / "discriminator.safetensors").exists():
        state["discriminator"] = load_safetensors(ckpt / "discriminator.safetensors")
    if with_disc and (ckpt / "disc_optimizer.pt").exists():
        state["disc_optimizer"] = load_torch_tensors(ckpt / "disc_optimizer.pt", device)
    return state


def newest_readable_checkpoint(checkpoints: list[Path], kind: str, with_disc: bool, device,
                               say: bool) -> tuple[Path, dict]:
    """The newest checkpoint read_checkpoint accepts, and its contents; says which newer ones it skipped."""
    reasons = []
    for ckpt in reversed(checkpoints):
        try:
            return ckpt, read_checkpoint(ckpt, kind, with_disc, device)
        except CheckpointError as e:
            reasons.append(str(e))
            if say:
                print(f"infgen train: skipping checkpoint {ckpt.name}: {e}", file=sys.stderr)
    raise CheckpointError(f"no readable checkpoint among {len(checkpoints)} in {checkpoints[0].parent} "
                          f"(newest: {reasons[0]})")


def load_weights(module: nn.Module, state: dict, source: str) -> None:
    check_state_dict(module.state_dict(), state, source)
    module.load_state_dict(state, strict=True)


def check_paths(cfg: "TrainConfig") -> None:
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


def base_shape(cfg: "TrainConfig", codec) -> dict:
    """InfGenConfig fields for model.base_from_codec: the codec decoder's widths and depth."""
    if not cfg.model.base_from_codec:
        return {}
    ae = getattr(codec, "autoencoder", None)
    if ae is None:
        raise ValueError(f"model.base_from_codec needs a KLAutoencoder codec (its decoder is copied); "
                         f"{cfg.codec} is a {type(codec).__name__}")
    return dict(base_channels=ae.config.decoder_channels, base_blocks=ae.config.blocks)


def warm_start(module: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Copy the tensors of checkpoint `path` whose names and shapes match `module`'s: (copied, skipped)."""
    from .checkpoint import WEIGHTS_NAME
    state = load_safetensors(Path(path) / WEIGHTS_NAME)
    own = module.state_dict()
    copied = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    skipped = sorted(set(own) - set(copied))
    module.load_state_dict({k: state[k] for k in copied}, strict=False)
    return copied, skipped


def save_grid(path: Path, panels: list[tuple[str, Tensor]], max_height: int = 384) -> None:
    """Panels (label, (3, h, w) in [-1, 1]) side by side, each shrunk to at most max_height, labelled."""
    from PIL import Image, ImageDraw
    images = []
    for label, img in panels:
        im = tensor_to_pil(img)
        if im.height > max_height:
            im = im.resize((max(1, round(im.width * max_height / im.height)), max_height), Image.BICUBIC)
        images.append((label, im))
    pad, text_h = 8, 16
    width = sum(im.width for _, im in images) + pad * (len(images) + 1)
    height = max(im.height for _, im in images) + text_h + 2 * pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw, x = ImageDraw.Draw(grid), pad
    for label, im in images:
        draw.text((x, pad // 2), label, fill=(0, 0, 0))
        grid.paste(im, (x, pad + text_h))
        x += im.width + pad
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)


def default_preview_sizes(d: DataConfig) -> list[tuple[int, int]]:
    """Square, 16:9 and 9:16 at the smallest target area, and the largest square."""
    m, sizes = d.out_min, []
    for ar in (1.0, 16 / 9, 9 / 16):
        sizes.append((max(8, round(m / math.sqrt(ar))), max(8, round(m * math.sqrt(ar)))))
    sizes.append((d.out_max, d.out_max))
    return sizes


def _stats_dict(stats) -> dict:
    if stats is None:
        return {}
    if isinstance(stats, dict):
        return dict(stats)
    if hasattr(stats, "as_dict"):
        return stats.as_dict()
    return {k: v for k, v in vars(stats).items() if not k.startswith("_")} if hasattr(stats, "__dict__") else {"stats": str(stats)}


@torch.no_grad()
def validation_psnr(kind: str, ema: nn.Module, codec, pairs: list, device) -> float:
    """Mean PSNR (dB) of the EMA model on (input, target) pairs: autoencoder reconstructions of the input,
    or InfGen decodes of the codec's latent at the target's size."""
    from .metrics import psnr
    scores = []
    for inp, gt in pairs:
        inp = inp.to(device)
        if kind == "autoencoder":
            out = ema.decode(ema.encode(inp)[0])[..., : gt.shape[-2], : gt.shape[-1]]
        else:
            out = ema.decode(codec.encode(inp), gt.shape[-2], gt.shape[-1])
        scores.append(float(psnr(out.float().clamp(-1, 1).cpu() * 0.5 + 0.5, gt * 0.5 + 0.5)[0]))
    return float(np.mean(scores))


class StepTimer:
    """Seconds per part of a training step (data, codec, model, loss_nets, optimizer), summed until reset.
    On a GPU every lap synchronises, so the parts are real (and the step a little slower)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.sums: dict[str, float] = {}
        self.t = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()                                           # note: sync point
        return time.perf_counter()

    def start(self) -> None:
        self.t = self._now()

    def lap(self, part: str) -> None:
        now = self._now()
        self.sums[part] = self.sums.get(part, 0.0) + now - self.t
        self.t = now

    def reset(self) -> None:
        self.sums = {}


# ----------------------------------------------------------------------------------------------------------
# The training loop.


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train according to `cfg`; returns the directory of the exported EMA model (OUTPUT/final)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from tqdm.auto import tqdm

    from .data import make_loader

    T, D, L, O = cfg.train, cfg.data, cfg.loss, cfg.optim
    if D.source is None:
        raise ValueError("no training data: pass --data PATH (folder of images or webdataset shards) or set data.source")
    check_paths(cfg)
    use_cpu = T.cpu or not torch.cuda.is_available()
    if T.cpu_threads > 0:
        torch.set_num_threads(T.cpu_threads)
    precision = T.mixed_precision
    if precision == "auto":
        from .precision import fast_dtype
        precision = "bf16" if fast_dtype("cpu" if use_cpu else "cuda") == torch.bfloat16 else "no"
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision)
    if accelerator.distributed_type == DistributedType.FSDP:
        # EMA, the adaptive GAN weight (a last-layer gradient) and the checkpoints here assume every rank holds
        # whole parameters. The presets (<= ~150M parameters) train comfortably under DDP.
        raise ValueError("FSDP is not supported by infgen train yet; launch with DDP (accelerate launch --multi_gpu)")
    rank, world, is_main, device = (accelerator.process_index, accelerator.num_processes,
                                    accelerator.is_main_process, accelerator.device)
    out = Path(cfg.output)
    ckpt_root = out / "checkpoints"
    checkpoints = list_checkpoints(ckpt_root)
    if checkpoints and not resume:
        raise ValueError(f"{out} already holds checkpoints (newest {checkpoints[-1].name}); pass --resume to "
                         "continue that run, or choose another --output")
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".step-*"):                                # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        import yaml
        atomic_write_bytes(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    accelerator.wait_for_everyone()

    # -- models (same seed on every rank; DDP also broadcasts rank 0's weights) --------------------------
    seed_all(cfg.seed)
    resume_ckpt = bool(resume and checkpoints)                                 # weights come from there
    codec = None
    if cfg.kind == "infgen":
        from .codecs import load_codec
        codec = load_codec(cfg.codec, device)
        from_codec = dict(latent_channels=codec.latent_channels, scaling_factor=float(codec.scaling_factor),
                          shift_factor=float(codec.shift_factor))
        for k, v in from_codec.items():
            if k in cfg.model.overrides and cfg.model.overrides[k] != v:
                raise ValueError(f"model.overrides.{k}={cfg.model.overrides[k]!r} contradicts the codec {cfg.codec} ({k}={v})")
        if cfg.model.init_from:
            model = InfGen.from_pretrained(cfg.model.init_from).train()
            got = {k: getattr(model.config, k) for k in from_codec}
            if got != from_codec:
                raise ValueError(f"model.init_from {cfg.model.init_from} was trained for latents {got}, "
                                 f"the codec {cfg.codec} has {from_codec}")
        else:
            model = InfGen(InfGenConfig.preset(cfg.model.preset, **{**cfg.model.overrides, **from_codec,
                                                                     **base_shape(cfg, codec)}))
        if cfg.model.warm_start and not resume_ckpt:
            copied, skipped = warm_start(model, cfg.model.warm_start)
            if is_main:
                print(f"infgen train: warm start from {cfg.model.warm_start}: {len(copied)} tensors copied, "
                      f"{len(skipped)} initialised afresh ({', '.join(skipped) or 'none'})", file=sys.stderr)
        if cfg.model.base_from_codec and not resume_ckpt and not cfg.model.init_from:
            model.init_base_from(codec.autoencoder.decoder)
        model.gradient_checkpointing = T.gradient_checkpointing
    elif cfg.model.init_from:
        model = KLAutoencoder.from_pretrained(cfg.model.init_from).train()
    else:
        model = KLAutoencoder(AutoencoderConfig.preset(cfg.model.preset, **cfg.model.overrides))
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    perceptual = None
    if L.perceptual_weight > 0 and L.perceptual != "none":
        layers = {"layers": tuple(L.perceptual_layers)} if L.perceptual_layers else {}
        perceptual = PerceptualLoss(L.perceptual, **layers).to(device)
    disc = (NLayerDiscriminator(3, L.disc_channels, L.disc_layers, L.disc_norm)
            if L.gan_weight > 0 else None)

    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": O.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=O.lr, betas=tuple(O.betas))
    d_opt = (torch.optim.AdamW(disc.parameters(), lr=O.disc_lr or O.lr, betas=(0.5, 0.9))  # taming's betas
             if disc is not None else None)

    # -- resume: weights before DDP wraps them, optimizer states after ----------------------------------
    step, ckpt, saved = 0, None, {}
    if resume and checkpoints:
        ckpt, saved = newest_readable_checkpoint(checkpoints, cfg.kind, disc is not None, device, is_main)
        step = saved["step"]
        load_weights(model, saved["model"], str(ckpt / "model.safetensors"))
        load_weights(ema, saved["ema"], str(ckpt / "ema.safetensors"))
        if "discriminator" in saved:
            load_weights(disc, saved["discriminator"], str(ckpt / "discriminator.safetensors"))
    elif resume and is_main:
        print(f"infgen train: no checkpoint in {ckpt_root}; starting from scratch", file=sys.stderr)
    ema.to(device)
    model, opt = accelerator.prepare(model, opt)
    if disc is not None:
        disc, d_opt = accelerator.prepare(disc, d_opt)
    raw_model = accelerator.unwrap_model(model)
    raw_disc = accelerator.unwrap_model(disc) if disc is not None else None
    last_layer = raw_model.decoder.conv_out.weight                             # for the adaptive GAN weight
    if ckpt is not None:
        opt.load_state_dict(saved["optimizer"])
        if "disc_optimizer" in saved:
            d_opt.load_state_dict(saved["disc_optimizer"])
    del saved                                                                  # the states now live in the modules

    # -- data: batch k of the stream is a function of (seed, rank, k): make_loader(start=k) resumes it exactly
    # for folders and split lists; shards only reseed at `start`, so the loader is rebuilt at every checkpoint
    # (an uninterrupted run and a resumed one then read the same batches either way).
    def loader_at(start: int, source: str | None = None, workers: int | None = None, seed: int = cfg.seed):
        sizes = (D.input_size, D.input_size) if cfg.kind == "autoencoder" else (D.out_min, D.out_max)
        return make_loader(source or D.source, input_size=D.input_size, out_min=sizes[0], out_max=sizes[1],
                           aspect_ratios=D.aspect_ratios, batch_size=D.batch_size,
                           num_workers=D.num_workers if workers is None else workers, seed=seed,
                           rank=rank, world_size=world, root=D.root, start=start, cache=D.cache)

    preview: list[dict] = []
    if is_main:                                                                # fixed batches, rank 0 only
        with preserved_rng():
            it = iter(loader_at(0, D.preview_source, workers=0, seed=cfg.seed + 7_777_777))
            preview = [next(it) for _ in range(max(1, T.stats_batches if cfg.kind == "autoencoder" else 1))]
            del it

    val_pairs: list = []
    if is_main and T.eval_every and D.val_source:                              # fixed pairs, rank 0 only
        from .data import resolve_source
        from .evaluate import validation_pairs
        val_files, _ = resolve_source(D.val_source, D.root)
        val_pairs = validation_pairs(val_files, D.val_input_size, 1 if cfg.kind == "autoencoder" else 2)

    if ckpt is not None:
        rng_file = ckpt / f"rng-rank{rank}.json"
        if rng_file.is_file():
            set_rng_state(read_json(rng_file))
        else:  # resumed on a different number of processes: a fresh but deterministic stream
            seed_all(cfg.seed * 7919 + rank * 104729 + step)
    else:
        seed_all(cfg.seed * 7919 + rank * 104729)

    # -- checkpoints and exports --------------------------------------------------------------------------
    def export() -> Path:
        """EMA weights -> OUTPUT/final (rank 0). The autoencoder records its latents' mean and 1/std first."""
        final = out / "final"
        if cfg.kind == "autoencoder":
            with torch.no_grad(), preserved_rng():
                z = torch.cat([ema.encode(b["input"].to(device))[0].float().flatten() for b in preview])
            ema.config.shift_factor = float(z.mean())
            ema.config.scaling_factor = float(1.0 / z.std().clamp_min(1e-6))
        ema.save_pretrained(final)
        return final

    def save_checkpoint() -> None:
        final_dir, tmp = ckpt_root / f"step-{step:09d}", ckpt_root / f".step-{step:09d}.tmp"
        if final_dir.exists():                                                 # already saved at this step
            return
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        atomic_write_bytes(tmp / f"rng-rank{rank}.json", json.dumps(rng_state()).encode())
        if is_main:
            atomic_save_safetensors(raw_model.state_dict(), tmp / "model.safetensors")
            atomic_save_safetensors(ema.state_dict(), tmp / "ema.safetensors")
            save_torch_tensors(opt.state_dict(), tmp / "optimizer.pt")
            if disc is not None:
                atomic_save_safetensors(raw_disc.state_dict(), tmp / "discriminator.safetensors")
                save_torch_tensors(d_opt.state_dict(), tmp / "disc_optimizer.pt")
            meta = {"step": step, "kind": cfg.kind, "world_size": world, "lr": lr_at(step, O, T.max_steps),
                    "time": time.time(), "config": cfg.to_dict()}
            atomic_write_bytes(tmp / "trainer.json", json.dumps(meta, indent=2).encode())
        accelerator.wait_for_everyone()
        if is_main:
            os.replace(tmp, final_dir)                                         # atomic: complete or absent
            for old in list_checkpoints(ckpt_root)[:-T.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            export()
        accelerator.wait_for_everyone()

    def write_preview() -> None:
        b = preview[0]
        panels: list[tuple[str, Tensor]] = []
        with torch.no_grad(), preserved_rng():
            if cfg.kind == "autoencoder":
                x = b["input"][:4].to(device)
                recon = ema.decode(ema.encode(x)[0])[..., : x.shape[-2], : x.shape[-1]]
                for i in range(x.shape[0]):
                    panels += [(f"input {i}", x[i]), (f"recon {i}", recon[i])]
            else:
                z = codec.encode(b["input"][:1].to(device))
                tgt = b["target"][0]
                H, W = tgt.shape[-2:]
                panels += [(f"input {D.input_size}^2", b["input"][0]), (f"truth {W}x{H}", tgt),
                           (f"ema {W}x{H}", ema.decode(z, H, W)[0])]
                for h, w in [tuple(s) for s in T.preview_sizes] or default_preview_sizes(D):
                    panels.append((f"ema {w}x{h}", ema.decode(z, h, w)[0]))
        save_grid(out / "samples" / f"step-{step:09d}.png", panels)

    # -- logging --------------------------------------------------------------------------------------------
    metrics_path = out / "metrics.jsonl"
    writer = None
    if is_main:
        if metrics_path.is_file():                                             # drop lines past the restart
            keep = []
            for ln in metrics_path.read_text().splitlines():
                with contextlib.suppress(ValueError):                          # a line torn by a kill
                    if json.loads(ln).get("step", 0) <= step:
                        keep.append(ln)
            atomic_write_bytes(metrics_path, "".join(ln + "\n" for ln in keep).encode())
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tensorboard"))
    bar = tqdm(total=T.max_steps, initial=step, disable=not is_main, desc=f"train {cfg.kind}", unit="step",
               dynamic_ncols=True)

    # -- SIGTERM / SIGINT: finish the step, checkpoint, exit 0 ----------------------------------------------
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True
        signal.signal(signum, signal.SIG_DFL)                                  # a second signal kills

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    loader = loader_at(step)            # its DataLoader has its own generator (data.Loader): rebuilding it at
    batches = iter(loader)              # a checkpoint or a resume leaves the training RNG streams alone
    sums: dict[str, float] = {}
    n_logged, timer = 0, StepTimer(device)                                      # step time, without saves
    try:
        while step < T.max_steps:
            timer.start()
            lr = lr_at(step, O, T.max_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = next(batches)
            timer.lap("data")
            gan_on = disc is not None and step >= L.gan_start

            # generator / autoencoder forward
            if cfg.kind == "infgen":
                with torch.no_grad(), accelerator.autocast():
                    z = codec.encode(batch["input"].to(device)).float()         # (B, C, h, w) raw latents
                timer.lap("codec")
                target = batch["target"].to(device)                            # (B, 3, H, W)
                H, W = target.shape[-2:]
                gh, gw = math.ceil(H / 8), math.ceil(W / 8)
                rows, cols = min(cfg.render_cells, gh), min(cfg.render_cells, gw)
                top, left = random.randint(0, gh - rows), random.randint(0, gw - cols)
                target = target[:, :, 8 * top: 8 * (top + rows), 8 * left: 8 * (left + cols)]
                pred = model(z, H, W, region=(top, left, rows, cols), halo=cfg.render_halo)  # same crop
                extra, own = {}, torch.zeros((), device=device)
            else:
                target = batch["input"].to(device)
                pred, mean, logvar = model(target)
                kl = KLAutoencoder.kl_loss(mean.float(), logvar.float())
                extra, own = {"kl": kl.detach()}, L.kl_weight * kl           # own: terms without loss networks
            timer.lap("model")
            # a region smaller than the PatchGAN's smallest input (small targets at extreme aspect ratios)
            # has no patch to judge: that step trains without the GAN terms
            gan_on = gan_on and min(pred.shape[-2:]) >= raw_disc.min_side

            # loss networks (perceptual, critic) on a detached copy: their forward and backward stop at the
            # prediction, so their cost is measured apart from the model's; the model then back-propagates
            # the gradient they leave on it (the same gradients as one backward of the total loss).
            leaf = pred.detach().requires_grad_(True)
            with accelerator.autocast():
                rec, parts = reconstruction_loss(leaf.float(), target.float(), perceptual, L.perceptual_weight,
                                                 L.perceptual_samples)
            grad, = torch.autograd.grad(rec, leaf)
            loss = rec.detach() + own.detach()
            parts.update(extra)
            if gan_on:
                raw_disc.requires_grad_(False)                                 # D is a fixed critic here
                with accelerator.autocast():
                    g_loss = hinge_g_loss(raw_disc(leaf.float()).float())
                g_grad, = torch.autograd.grad(g_loss, leaf)
                raw_disc.requires_grad_(True)
                d_weight = adaptive_weight(pred, grad, g_grad, last_layer, L.max_d_weight)
                grad = grad + L.gan_weight * d_weight * g_grad
                loss = loss + L.gan_weight * d_weight * g_loss.detach()
                parts.update(g_loss=g_loss.detach(), d_weight=d_weight)
            timer.lap("loss_nets")
            accelerator.backward((pred.float() * grad.float()).sum() + own)            # d/dθ equals that of `loss`
            if O.grad_clip > 0:
                parts["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), O.grad_clip)
            timer.lap("model")
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, raw_model, min(O.ema_decay, (1 + step) / (10 + step)))
            timer.lap("optimizer")

            # discriminator step: real crops vs detached reconstructions, one forward (GroupNorm is per sample)
            if gan_on:
                with accelerator.autocast():
                    logits = disc(torch.cat([target, pred.detach()]).float()).float()
                real, fake = logits.chunk(2)
                d_loss = hinge_d_loss(real, fake)
                accelerator.backward(d_loss)
                if O.grad_clip > 0:
                    accelerator.clip_grad_norm_(disc.parameters(), O.grad_clip)
                d_opt.step()
                d_opt.zero_grad(set_to_none=True)
                parts.update(d_loss=d_loss.detach(), logits_real=real.detach().mean(), logits_fake=fake.detach().mean())
                timer.lap("loss_nets")
            step += 1
            bar.update(1)

            # logging (rank 0's own numbers: no cross-rank sync; tensors stay on the device until a log line)
            parts["loss"] = loss.detach()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            n_logged += 1
            if is_main and (step % T.log_every == 0 or step == T.max_steps):
                split = {f"t_{k}": v / n_logged for k, v in timer.sums.items()}      # seconds per step
                dt = sum(split.values())
                rec_ = {"step": step, **{k: float(v) / n_logged for k, v in sums.items()}, "lr": lr,
                        "s_per_step": dt, **split, "data_wait_s": split["t_data"], "it_s": 1.0 / dt,
                        "images_per_s": D.batch_size * world / dt,
                        "target_hw": list(batch["target"].shape[-2:]) if cfg.kind == "infgen" else None,
                        "data": _stats_dict(getattr(loader, "stats", None))}
                if perceptual is not None and "perceptual" in rec_:
                    rec_[perceptual.name] = rec_.pop("perceptual")             # vgg19_feat, never 'lpips'
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec_, default=float) + "\n")
                if writer is not None:
                    for k, v in rec_.items():
                        if isinstance(v, float):
                            writer.add_scalar(f"train/{k}", v, step)
                bar.set_postfix(loss=f"{rec_['loss']:.4f}", l1=f"{rec_['l1']:.4f}", lr=f"{lr:.2e}",
                                s="/".join(f"{v:.2f}" for v in split.values()), refresh=False)
                sums, n_logged = {}, 0
                timer.reset()
            elif not is_main and step % T.log_every == 0:
                sums, n_logged = {}, 0
                timer.reset()

            if is_main and T.sample_every and step % T.sample_every == 0:
                write_preview()
            if is_main and val_pairs and (step % T.eval_every == 0 or step == T.max_steps):
                with preserved_rng():
                    val = validation_psnr(cfg.kind, ema, codec, val_pairs, device)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": step, "val_psnr": val, "val_images": len(val_pairs)}) + "\n")

            # agree on stopping: a signal may reach the ranks at different steps
            stopping = stop["flag"]
            if world > 1:
                flag = torch.tensor([float(stopping)], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # note: sync point
                stopping = bool(flag.item())
            if step % T.ckpt_every == 0 or step == T.max_steps or stopping:
                save_checkpoint()
                if stopping:
                    break
                if step < T.max_steps:                                         # restart the stream at (seed, step)
                    del batches, loader
                    loader = loader_at(step)
                    batches = iter(loader)
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if writer is not None:
            writer.close()

    final = out / "final"
    if is_main:
        if not stop["flag"] and not (T.sample_every and step % T.sample_every == 0):
            write_preview()
        final = export()
    if T.debug_rank_weights:
        (out / "debug").mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({**{f"model.{k}": v for k, v in raw_model.state_dict().items()},
                                 **{f"ema.{k}": v for k, v in ema.state_dict().items()}},
                                out / "debug" / f"rank{rank}.safetensors")
    accelerator.wait_for_everyone()
    if is_main and stop["flag"]:
        print(f"infgen train: stopped by signal at step {step}; resume with --resume", file=sys.stderr)
    accelerator.end_training()
    return final


# ----------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML training config (see configs/)")
    parser.add_argument("--data", help="training data: image folder or webdataset shards (sets data.source)")
    parser.add_argument("--output", help="run directory (sets output)")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (sets train.max_steps)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set, **{"data.source": args.data, "output": args.output,
                                               "train.max_steps": args.max_steps})
    final = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"infgen train: exported the EMA model to {final}")
    return 0

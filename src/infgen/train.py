"""`infgen train`: train InfGen (or the project's small KL autoencoder) from one CPU to many GPUs.

    infgen train --config configs/cpu-small.yaml --data data/photos [--output DIR] [--max-steps N]
                 [--resume] [--set optim.lr=1e-4 --set data.batch_size=8 ...]
    accelerate launch --multi_gpu --num_processes 8 -m infgen train --config configs/paper-stage1.yaml ...

In the spirit of DiT's and nanoGPT's train.py: `train` is the loop, built from the named parts above it
(model and optimizer construction, one forward per kind, the generator and discriminator updates, previews
and the export). accelerate (DDP, bf16 autocast on GPU), AdamW with linear warm-up + cosine decay, EMA
weights (the exported model), gradient clipping, L1 + perceptual + PatchGAN hinge losses (losses.py),
atomic checkpoints that resume exactly (train_checkpoint.py), SIGTERM/SIGINT -> finish the step,
checkpoint, exit 0. The configuration is train_config.py; metrics and the progress bar, train_log.py.

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
import copy
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .autoencoder import AutoencoderConfig, KLAutoencoder
from .checkpoint import atomic_save_safetensors, atomic_write_bytes, load_safetensors
from .config import InfGenConfig
from .images import tensor_to_pil
from .layers import ResBlock
from .losses import NLayerDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, reconstruction_loss
from .model import InfGen
from .perceptual import PerceptualLoss
from .train_checkpoint import Checkpointer, preserved_rng, seed_all, seed_streams
from .train_config import (DataConfig, LoopConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig,
                           check_paths, load_config)
from .train_log import RunLog, StepTimer

# ----------------------------------------------------------------------------------------------------------
# Schedule and EMA.


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warm-up to optim.lr, then cosine decay to optim.min_lr at the horizon, then constant (nanoGPT)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    horizon = optim.decay_steps or max_steps
    progress = min((step - optim.warmup_steps) / max(horizon - optim.warmup_steps, 1), 1.0)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = [p for p in ema.parameters()]
    model_params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):           # not trained: copied, not averaged
        ema_buffer.copy_(buffer)


# ----------------------------------------------------------------------------------------------------------
# Construction: accelerator, models, loss networks, optimizers.


def make_accelerator(loop: LoopConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    use_cpu = loop.cpu or not torch.cuda.is_available()
    if loop.cpu_threads > 0:
        torch.set_num_threads(loop.cpu_threads)
    precision = loop.mixed_precision
    if precision == "auto":
        from .precision import fast_dtype
        precision = "bf16" if fast_dtype("cpu" if use_cpu else "cuda") == torch.bfloat16 else "no"
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision)
    if accelerator.distributed_type == DistributedType.FSDP:
        # EMA, the adaptive GAN weight (a last-layer gradient) and the checkpoints here assume every rank holds
        # whole parameters. The presets (<= ~150M parameters) train comfortably under DDP.
        raise ValueError("FSDP is not supported by infgen train yet; launch with DDP (accelerate launch --multi_gpu)")
    return accelerator


@dataclass
class Nets:
    """Everything a training step touches. After `prepare`, model and disc are accelerate's wrappers (DDP on
    several processes) and raw_model / raw_disc the modules inside them."""
    model: nn.Module
    ema: nn.Module                                   # the exported weights; never wrapped
    opt: torch.optim.Optimizer
    codec: object | None                             # kind: infgen: the frozen codec
    perceptual: PerceptualLoss | None
    disc: nn.Module | None                           # the PatchGAN critic (loss.gan_weight > 0)
    d_opt: torch.optim.Optimizer | None
    raw_model: nn.Module | None = field(default=None, init=False)
    raw_disc: nn.Module | None = field(default=None, init=False)

    def prepare(self, accelerator) -> None:
        self.model, self.opt = accelerator.prepare(self.model, self.opt)
        if self.disc is not None:
            self.disc, self.d_opt = accelerator.prepare(self.disc, self.d_opt)
        self.raw_model = accelerator.unwrap_model(self.model)
        self.raw_disc = accelerator.unwrap_model(self.disc) if self.disc is not None else None

    @property
    def last_layer(self) -> Tensor:
        return self.raw_model.decoder.conv_out.weight                          # for the adaptive GAN weight


def build_nets(cfg: TrainConfig, device, resuming: bool, say: bool) -> Nets:
    """Models, loss networks and optimizers, in this order (it is the order of their draws from torch's RNG).
    `resuming`: the weights will come from a checkpoint, so no warm start or copy from the codec."""
    codec = None
    if cfg.kind == "infgen":
        from .codecs import load_codec
        codec = load_codec(cfg.codec, device)
        model = build_infgen(cfg, codec, resuming, say)
    else:
        model = build_autoencoder(cfg.model, resuming, say)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    perceptual, disc = build_loss_nets(cfg.loss, device)
    opt, d_opt = build_optimizers(model, disc, cfg.optim)
    return Nets(model, ema, opt, codec, perceptual, disc, d_opt)


def build_infgen(cfg: TrainConfig, codec, resuming: bool, say: bool) -> InfGen:
    """A preset (plus overrides) or model.init_from, for the codec's latent space; then model.warm_start or
    model.base_from_codec on a new run."""
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
    if cfg.model.warm_start and not resuming:
        warm_start(model, cfg.model.warm_start, say)
    if cfg.model.base_from_codec and not resuming and not cfg.model.init_from:
        model.init_base_from(codec.autoencoder.decoder, keep_residual=cfg.model.keep_residual)
    if cfg.model.freeze_base:
        if model.base is None:
            raise ValueError("model.freeze_base needs a model with a base decoder (model.base_from_codec or "
                             "model.overrides.base_channels)")
        model.base.requires_grad_(False)
    model.gradient_checkpointing = cfg.train.gradient_checkpointing
    return model


def build_autoencoder(model_cfg: ModelConfig, resuming: bool, say: bool) -> KLAutoencoder:
    if model_cfg.init_from:
        model = KLAutoencoder.from_pretrained(model_cfg.init_from).train()
    else:
        model = KLAutoencoder(AutoencoderConfig.preset(model_cfg.preset, **model_cfg.overrides))
    if model_cfg.warm_start and not resuming:
        warm_start(model, model_cfg.warm_start, say)
    if model_cfg.freeze_encoder:      # the latent space stays the checkpoint's: models trained on it still fit
        model.encoder.requires_grad_(False)
    return model


def build_loss_nets(loss: LossConfig, device) -> tuple[PerceptualLoss | None, NLayerDiscriminator | None]:
    perceptual = None
    if loss.perceptual_weight > 0 and loss.perceptual != "none":
        layers = {"layers": tuple(loss.perceptual_layers)} if loss.perceptual_layers else {}
        perceptual = PerceptualLoss(loss.perceptual, **layers).to(device)
    disc = NLayerDiscriminator(3, loss.disc_channels, loss.disc_layers, loss.disc_norm) if loss.gan_weight > 0 else None
    return perceptual, disc


def build_optimizers(model: nn.Module, disc: nn.Module | None, optim: OptimConfig):
    """AdamW with weight decay on matrices and conv kernels only (nanoGPT); the critic's, constant lr."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr, betas=tuple(optim.betas))
    d_opt = (torch.optim.AdamW(disc.parameters(), lr=optim.disc_lr or optim.lr, betas=(0.5, 0.9))  # taming's betas
             if disc is not None else None)
    return opt, d_opt


def base_shape(cfg: TrainConfig, codec) -> dict:
    """InfGenConfig fields for model.base_from_codec: the codec decoder's widths and depth."""
    if not cfg.model.base_from_codec:
        return {}
    ae = getattr(codec, "autoencoder", None)
    if ae is None:
        raise ValueError(f"model.base_from_codec needs a KLAutoencoder codec (its decoder is copied); "
                         f"{cfg.codec} is a {type(codec).__name__}")
    return dict(base_channels=ae.config.decoder_channels, base_blocks=ae.config.decoder_depth)


def warm_start(module: nn.Module, path: str | Path, say: bool = False) -> tuple[list[str], list[str]]:
    """Copy the tensors of checkpoint `path` whose names and shapes match `module`'s: (copied, skipped);
    `say`: print both lists."""
    from .checkpoint import WEIGHTS_NAME
    state = load_safetensors(Path(path) / WEIGHTS_NAME)
    own = module.state_dict()
    copied = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    skipped = sorted(set(own) - set(copied))
    module.load_state_dict({k: state[k] for k in copied}, strict=False)
    grow_identity(module, set(skipped))
    if say:
        print(f"infgen train: warm start from {path}: {len(copied)} tensors copied, {len(skipped)} initialised "
              f"afresh ({', '.join(skipped) or 'none'})", file=sys.stderr)
    return copied, skipped


@torch.no_grad()
def grow_identity(module: nn.Module, fresh: set[str]) -> None:
    """Residual blocks none of whose tensors were copied start as the identity (their last convolution
    zeroed): a deeper decoder warm-started from a shallower one computes at step 0 what the checkpoint did."""
    for name, sub in module.named_modules():
        if isinstance(sub, ResBlock) and all(f"{name}.{k}" in fresh for k, _ in sub.named_parameters()):
            nn.init.zeros_(sub.conv2.weight)
            nn.init.zeros_(sub.conv2.bias)


# ----------------------------------------------------------------------------------------------------------
# One training step: a forward per kind, then the generator update and, once the GAN is on, the critic's.


@dataclass
class Forward:
    """A model's output on a batch and what it is compared with."""
    pred: Tensor                                     # (B, 3, h, w), with its graph
    target: Tensor                                   # (B, 3, h, w)
    own: Tensor                                      # loss terms without loss networks (the KL), with graph
    parts: dict                                      # their logged values


def infgen_forward(nets: Nets, batch: dict, cfg: TrainConfig, accelerator, timer: StepTimer) -> Forward:
    """The frozen codec encodes the input crop; InfGen renders a random region of render_cells^2 8x8 cells
    of the target size, compared with the same crop of the target."""
    device = accelerator.device
    with torch.no_grad(), accelerator.autocast():
        latents = nets.codec.encode(batch["input"].to(device)).float()         # (B, C, h, w) raw latents
    timer.lap("codec")
    target = batch["target"].to(device)                                        # (B, 3, H, W)
    height, width = target.shape[-2:]
    grid_h, grid_w = math.ceil(height / 8), math.ceil(width / 8)
    rows, cols = min(cfg.render_cells, grid_h), min(cfg.render_cells, grid_w)
    top, left = random.randint(0, grid_h - rows), random.randint(0, grid_w - cols)
    target = target[:, :, 8 * top: 8 * (top + rows), 8 * left: 8 * (left + cols)]
    pred = nets.model(latents, height, width, region=(top, left, rows, cols), halo=cfg.render_halo)  # same crop
    return Forward(pred, target, own=torch.zeros((), device=device), parts={})


def autoencoder_forward(nets: Nets, batch: dict, cfg: TrainConfig, accelerator, timer: StepTimer) -> Forward:
    """Reconstruct the input crop; the posterior's KL term is the model's own loss."""
    target = batch["input"].to(accelerator.device)
    pred, mean, logvar = nets.model(target)
    kl = KLAutoencoder.kl_loss(mean.float(), logvar.float())
    return Forward(pred, target, own=cfg.loss.kl_weight * kl, parts={"kl": kl.detach()})


FORWARD = {"infgen": infgen_forward, "autoencoder": autoencoder_forward}


def train_step(nets: Nets, batch: dict, step: int, cfg: TrainConfig, accelerator, timer: StepTimer) -> dict:
    """One optimisation step of the model, and of the critic once the GAN is on; returns the logged parts
    (device tensors), "loss" last."""
    fwd = FORWARD[cfg.kind](nets, batch, cfg, accelerator, timer)
    timer.lap("model")
    # a region smaller than the PatchGAN's smallest input (small targets at extreme aspect ratios) has no
    # patch to judge: that step trains without the GAN terms
    gan_on = (nets.disc is not None and step >= cfg.loss.gan_start
              and min(fwd.pred.shape[-2:]) >= nets.raw_disc.min_side)
    loss, parts = generator_step(nets, fwd, gan_on, step, cfg, accelerator, timer)
    if gan_on:
        parts.update(discriminator_step(nets, fwd, cfg.optim.grad_clip, accelerator))
        timer.lap("loss_nets")
    parts["loss"] = loss.detach()
    return parts


def generator_step(nets: Nets, fwd: Forward, gan_on: bool, step: int, cfg: TrainConfig, accelerator,
                   timer: StepTimer) -> tuple[Tensor, dict]:
    """Reconstruction (+ perceptual) loss and, when on, the adaptively weighted GAN term; backward, clip,
    AdamW, EMA. Returns the total loss (detached) and the logged parts."""
    # loss networks (perceptual, critic) on a detached copy: their forward and backward stop at the
    # prediction, so their cost is measured apart from the model's; the model then back-propagates
    # the gradient they leave on it (the same gradients as one backward of the total loss).
    leaf = fwd.pred.detach().requires_grad_(True)
    with accelerator.autocast():
        rec, parts = reconstruction_loss(leaf.float(), fwd.target.float(), nets.perceptual,
                                         cfg.loss.perceptual_weight, cfg.loss.perceptual_samples)
    grad, = torch.autograd.grad(rec, leaf)
    loss = rec.detach() + fwd.own.detach()
    parts.update(fwd.parts)
    if gan_on:
        gan_grad, gan_loss, gan_parts = generator_gan_term(nets, leaf, fwd.pred, grad, cfg.loss, accelerator)
        grad = grad + gan_grad
        loss = loss + gan_loss
        parts.update(gan_parts)
    timer.lap("loss_nets")
    accelerator.backward((fwd.pred.float() * grad.float()).sum() + fwd.own)   # d/dθ equals that of `loss`
    if cfg.optim.grad_clip > 0:
        parts["grad_norm"] = accelerator.clip_grad_norm_(nets.model.parameters(), cfg.optim.grad_clip)
    timer.lap("model")
    nets.opt.step()
    nets.opt.zero_grad(set_to_none=True)
    update_ema(nets.ema, nets.raw_model, min(cfg.optim.ema_decay, (1 + step) / (10 + step)))
    timer.lap("optimizer")
    return loss, parts


def generator_gan_term(nets: Nets, leaf: Tensor, pred: Tensor, rec_grad: Tensor, loss: LossConfig,
                       accelerator) -> tuple[Tensor, Tensor, dict]:
    """The critic's hinge loss on the prediction, weighted by gan_weight x the adaptive weight (taming):
    its gradient on the prediction, its value (detached) and the logged parts."""
    nets.raw_disc.requires_grad_(False)                                        # D is a fixed critic here
    with accelerator.autocast():
        g_loss = hinge_g_loss(nets.raw_disc(leaf.float()).float())
    g_grad, = torch.autograd.grad(g_loss, leaf)
    nets.raw_disc.requires_grad_(True)
    d_weight = adaptive_weight(pred, rec_grad, g_grad, nets.last_layer, loss.max_d_weight)
    weight = loss.gan_weight * d_weight
    return weight * g_grad, weight * g_loss.detach(), {"g_loss": g_loss.detach(), "d_weight": d_weight}


def discriminator_step(nets: Nets, fwd: Forward, grad_clip: float, accelerator) -> dict:
    """Real crops vs detached predictions, in one forward (GroupNorm is per sample); hinge loss."""
    with accelerator.autocast():
        logits = nets.disc(torch.cat([fwd.target, fwd.pred.detach()]).float()).float()
    real, fake = logits.chunk(2)
    d_loss = hinge_d_loss(real, fake)
    accelerator.backward(d_loss)
    if grad_clip > 0:
        accelerator.clip_grad_norm_(nets.disc.parameters(), grad_clip)
    nets.d_opt.step()
    nets.d_opt.zero_grad(set_to_none=True)
    return {"d_loss": d_loss.detach(), "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}


# ----------------------------------------------------------------------------------------------------------
# Data, previews, validation, export.


def train_loader(cfg: TrainConfig, rank: int, world: int, start: int, source: str | None = None,
                 workers: int | None = None, seed: int | None = None):
    """Batch k of the stream is a function of (seed, rank, k): make_loader(start=k) resumes it exactly for
    folders and split lists; shards only reseed at `start`, so the loop rebuilds the loader at every
    checkpoint (an uninterrupted run and a resumed one then read the same batches either way)."""
    from .data import make_loader
    data = cfg.data
    sizes = (data.input_size, data.input_size) if cfg.kind == "autoencoder" else (data.out_min, data.out_max)
    return make_loader(source or data.source, input_size=data.input_size, out_min=sizes[0], out_max=sizes[1],
                       aspect_ratios=data.aspect_ratios, batch_size=data.batch_size,
                       num_workers=data.num_workers if workers is None else workers,
                       seed=cfg.seed if seed is None else seed, rank=rank, world_size=world, root=data.root,
                       start=start, cache=data.cache)


def preview_batches(cfg: TrainConfig, rank: int, world: int) -> list[dict]:
    """Fixed batches (their own seed, no workers) for the preview grids and the autoencoder's latent
    statistics."""
    with preserved_rng():
        batches = iter(train_loader(cfg, rank, world, 0, cfg.data.preview_source, workers=0, seed=cfg.seed + 7_777_777))
        preview = [next(batches) for _ in range(max(1, cfg.train.stats_batches if cfg.kind == "autoencoder" else 1))]
        del batches
    return preview


def validation_set(cfg: TrainConfig) -> list:
    """(input, target) pairs of data.val_source: the `infgen eval` protocol, at 1x (autoencoder) or 2x."""
    from .data import resolve_source
    from .evaluate import validation_pairs
    val_files, _ = resolve_source(cfg.data.val_source, cfg.data.root)
    return validation_pairs(val_files, cfg.data.val_input_size, 1 if cfg.kind == "autoencoder" else 2)


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


def default_preview_sizes(data: DataConfig) -> list[tuple[int, int]]:
    """Square, 16:9 and 9:16 at the smallest target area, and the largest square."""
    side, sizes = data.out_min, []
    for aspect in (1.0, 16 / 9, 9 / 16):
        sizes.append((max(8, round(side / math.sqrt(aspect))), max(8, round(side * math.sqrt(aspect)))))
    sizes.append((data.out_max, data.out_max))
    return sizes


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


def write_preview(path: Path, cfg: TrainConfig, nets: Nets, batch: dict, device) -> None:
    """The EMA model on a fixed batch: autoencoder reconstructions, or InfGen at the target's size and at
    train.preview_sizes (default: default_preview_sizes)."""
    panels: list[tuple[str, Tensor]] = []
    with torch.no_grad(), preserved_rng():
        if cfg.kind == "autoencoder":
            inputs = batch["input"][:4].to(device)
            recon = nets.ema.decode(nets.ema.encode(inputs)[0])[..., : inputs.shape[-2], : inputs.shape[-1]]
            for i in range(inputs.shape[0]):
                panels += [(f"input {i}", inputs[i]), (f"recon {i}", recon[i])]
        else:
            latents = nets.codec.encode(batch["input"][:1].to(device))
            truth = batch["target"][0]
            height, width = truth.shape[-2:]
            panels += [(f"input {cfg.data.input_size}^2", batch["input"][0]), (f"truth {width}x{height}", truth),
                       (f"ema {width}x{height}", nets.ema.decode(latents, height, width)[0])]
            for h, w in [tuple(s) for s in cfg.train.preview_sizes] or default_preview_sizes(cfg.data):
                panels.append((f"ema {w}x{h}", nets.ema.decode(latents, h, w)[0]))
    save_grid(path, panels)


def export(ema: nn.Module, kind: str, out: Path, preview: list[dict], device) -> Path:
    """EMA weights -> OUTPUT/final (rank 0). The autoencoder records its latents' mean and 1/std first."""
    final = out / "final"
    if kind == "autoencoder":
        with torch.no_grad(), preserved_rng():
            latents = torch.cat([ema.encode(batch["input"].to(device))[0].float().flatten() for batch in preview])
        ema.config.shift_factor = float(latents.mean())
        ema.config.scaling_factor = float(1.0 / latents.std().clamp_min(1e-6))
    ema.save_pretrained(final)
    return final


def save_checkpoint(checkpointer: Checkpointer, step: int, cfg: TrainConfig, nets: Nets, accelerator,
                    preview: list[dict]) -> None:
    """Checkpoint `step`, then refresh OUTPUT/final from the EMA weights (every rank calls this)."""
    meta = {"step": step, "kind": cfg.kind, "world_size": accelerator.num_processes,
            "lr": lr_at(step, cfg.optim, cfg.train.max_steps), "time": time.time(), "config": cfg.to_dict()}
    states = {"model": nets.raw_model, "ema": nets.ema, "optimizer": nets.opt, "discriminator": nets.raw_disc,
              "disc_optimizer": nets.d_opt}
    if checkpointer.save(step, states, meta):
        if accelerator.is_main_process:
            export(nets.ema, cfg.kind, Path(cfg.output), preview, accelerator.device)
        accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------
# The training loop.


class StopRequest:
    """SIGTERM / SIGINT while training: the loop finishes its step, checkpoints and exits 0. A second signal
    kills. The handlers are installed for the `with` block only."""

    def __init__(self):
        self.requested = False                     # by a signal to this process
        self.stopped = False                       # agreed by all ranks: this run stops early
        self.old_handlers: dict = {}

    def __enter__(self) -> StopRequest:
        self.old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.old_handlers.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signum, signal.SIG_DFL)

    def agreed(self, world: int, device) -> bool:
        """Stop if any rank was asked to: a signal may reach the ranks at different steps."""
        if world == 1:
            self.stopped = self.requested
            return self.stopped
        flag = torch.tensor([float(self.requested)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # note: sync point
        self.stopped = bool(flag.item())
        return self.stopped


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train according to `cfg`; returns the directory of the exported EMA model (OUTPUT/final)."""
    if cfg.data.source is None:
        raise ValueError("no training data: pass --data PATH (folder of images or webdataset shards) or set data.source")
    check_paths(cfg)
    accelerator = make_accelerator(cfg.train)
    rank, world, is_main, device = (accelerator.process_index, accelerator.num_processes,
                                    accelerator.is_main_process, accelerator.device)
    out = Path(cfg.output)
    checkpointer = Checkpointer(out / "checkpoints", accelerator, cfg.train.keep_checkpoints)
    checkpointer.begin(resume)
    if is_main:
        import yaml
        atomic_write_bytes(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    accelerator.wait_for_everyone()

    seed_all(cfg.seed)                      # the same initial weights on every rank (DDP also broadcasts rank 0's)
    nets = build_nets(cfg, device, resuming=resume and bool(checkpointer.found), say=is_main)
    resumed = checkpointer.newest(cfg.kind, nets.disc is not None, device) if resume else None
    if resumed is not None:                 # weights before DDP wraps them, optimizer states after
        resumed.load({"model": nets.model, "ema": nets.ema, "discriminator": nets.disc})
    nets.ema.to(device)
    nets.prepare(accelerator)
    if resumed is not None:
        resumed.load({"optimizer": nets.opt, "disc_optimizer": nets.d_opt})
    step = resumed.step if resumed is not None else 0

    preview = preview_batches(cfg, rank, world) if is_main else []           # fixed batches, rank 0 only
    val_pairs = validation_set(cfg) if is_main and cfg.train.eval_every and cfg.data.val_source else []
    seed_streams(cfg.seed, rank, resumed)
    timer = StepTimer(device)                                                  # step time, without saves
    log = RunLog(cfg, step, world, is_main, timer, nets.perceptual.name if nets.perceptual is not None else None)
    with StopRequest() as stop:
        try:
            loader = train_loader(cfg, rank, world, step)   # its DataLoader has its own generator (data.Loader):
            batches = iter(loader)                          # a rebuild leaves the training RNG streams alone
            while step < cfg.train.max_steps:
                timer.start()
                lr = lr_at(step, cfg.optim, cfg.train.max_steps)
                for group in nets.opt.param_groups:
                    group["lr"] = lr
                batch = next(batches)
                timer.lap("data")
                parts = train_step(nets, batch, step, cfg, accelerator, timer)
                step += 1
                log.step(step, parts, lr, batch, loader)

                if is_main and cfg.train.sample_every and step % cfg.train.sample_every == 0:
                    write_preview(out / "samples" / f"step-{step:09d}.png", cfg, nets, preview[0], device)
                if is_main and val_pairs and (step % cfg.train.eval_every == 0 or step == cfg.train.max_steps):
                    with preserved_rng():
                        val = validation_psnr(cfg.kind, nets.ema, nets.codec, val_pairs, device)
                    log.write({"step": step, "val_psnr": val, "val_images": len(val_pairs)})

                stopping = stop.agreed(world, device)
                if step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps or stopping:
                    save_checkpoint(checkpointer, step, cfg, nets, accelerator, preview)
                    if stopping:
                        break
                    if step < cfg.train.max_steps:                             # restart the stream at (seed, step)
                        del batches, loader
                        loader = train_loader(cfg, rank, world, step)
                        batches = iter(loader)
        finally:
            log.close()

    final = out / "final"
    if is_main:
        if not stop.stopped and not (cfg.train.sample_every and step % cfg.train.sample_every == 0):
            write_preview(out / "samples" / f"step-{step:09d}.png", cfg, nets, preview[0], device)
        final = export(nets.ema, cfg.kind, out, preview, device)
    if cfg.train.debug_rank_weights:
        (out / "debug").mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({**{f"model.{k}": v for k, v in nets.raw_model.state_dict().items()},
                                 **{f"ema.{k}": v for k, v in nets.ema.state_dict().items()}},
                                out / "debug" / f"rank{rank}.safetensors")
    accelerator.wait_for_everyone()
    if is_main and stop.stopped:
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

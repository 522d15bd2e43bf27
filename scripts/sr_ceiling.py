"""How much can any learned 2x upscaler add to the codec's own decode? A ceiling for InfGen's 2x target.

InfGen at 2x has to beat the codec's decode + bicubic (docs/training.md). This trains a plain SR network (EDSR
style: residual blocks at the decode's resolution, pixel shuffle x2, added to the bicubic resize; the last
layer at zero, so step 0 is codec + bicubic exactly) on (codec decode of a 256^2 crop, the 512^2 crop)
pairs from the training photos with L1, and reports PSNR on the `infgen eval` 2x protocol (the 15
validation photos). It sees the decoded image, which the latent determines: what it gains is what a
decoder that renders 2x directly could gain over codec + bicubic, give or take the network's size.

    python scripts/sr_ceiling.py                                    # the bundled codec, 1,500 steps (~7 min on 2 cores)
    python scripts/sr_ceiling.py --codec checkpoints/autoencoder-16ch-d2 --blocks 12 --steps 4000
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from infgen.codecs import load_codec
from infgen.evaluate import validation_pairs
from infgen.images import open_rgb, pil_to_tensor
from infgen.metrics import psnr
from infgen.pipeline import InfGenPipeline


def split_photos(root: str, split: str) -> list[Path]:
    """The photos of the committed split data/splits/<split>.txt (`infgen data photos` writes them)."""
    return [Path(root) / name for name in Path(f"data/splits/{split}.txt").read_text().split()]


def crop_pairs(photos: list[Path], per_photo: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Random square crops (512 px to 2048 px a side) of each photo, as (256^2 input, 512^2 target) pairs
    resized with Lanczos like the eval protocol's centre crops."""
    ins, gts = [], []
    for path in photos:
        im = open_rgb(path, max_pixels=None)
        w, h = im.size
        for _ in range(per_photo):
            side = rng.randint(512, min(w, h, 2048))
            x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
            box = (x0, y0, x0 + side, y0 + side)
            ins.append(pil_to_tensor(im.resize((256, 256), Image.LANCZOS, box=box)))
            gts.append(pil_to_tensor(im.resize((512, 512), Image.LANCZOS, box=box)))
    return torch.cat(ins), torch.cat(gts)


@torch.no_grad()
def decode(codec, images: torch.Tensor) -> torch.Tensor:
    """The codec's own 1x reconstruction, (N, 3, 256, 256) in [-1, 1]."""
    return torch.cat([codec.decode(codec.encode(images[i:i + 16])).float().clamp(-1, 1)
                      for i in range(0, len(images), 16)])


def bicubic2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)


def mean_psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over images of PSNR (dB) of x against y, both in [-1, 1] (as training's val_psnr)."""
    return psnr(x.clamp(-1, 1) * 0.5 + 0.5, y * 0.5 + 0.5).mean().item()


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class Upscaler(nn.Module):
    """bicubic 2x + a learned residual (pixel shuffle of features at the input's resolution)."""

    def __init__(self, channels: int, blocks: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(channels) for _ in range(blocks)])
        self.conv_out = nn.Conv2d(channels, 12, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                        # (B, 3, h, w)
        return bicubic2x(x) + F.pixel_shuffle(self.conv_out(self.body(self.conv_in(x))), 2)   # (B, 3, 2h, 2w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codec", default=None, help="a codec directory (default: the bundled default's)")
    ap.add_argument("--photos", default="data/photos")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    codec = load_codec(args.codec) if args.codec else InfGenPipeline.from_pretrained(dtype=torch.float32).codec
    inputs, targets = crop_pairs(split_photos(args.photos, "train"), 10, rng)
    decoded = decode(codec, inputs)
    val = validation_pairs(split_photos(args.photos, "val"), 256, 2)
    val_decoded, val_gt = decode(codec, torch.cat([p[0] for p in val])), torch.cat([p[1] for p in val])
    print(f"{len(inputs)} training pairs; 2x on {len(val)} validation photos: codec + bicubic "
          f"{mean_psnr(bicubic2x(val_decoded), val_gt):.3f} dB", flush=True)

    net = Upscaler(args.channels, args.blocks).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-4, total_steps=args.steps, pct_start=0.03)
    patch, batch, t0 = 64, 16, time.perf_counter()
    for step in range(1, args.steps + 1):
        i = torch.randint(0, len(decoded), (batch,)).tolist()
        y = torch.randint(0, 256 - patch + 1, (batch,)).tolist()
        x = torch.randint(0, 256 - patch + 1, (batch,)).tolist()
        lo = torch.stack([decoded[k, :, a:a + patch, b:b + patch] for k, a, b in zip(i, y, x)])
        hi = torch.stack([targets[k, :, 2 * a:2 * a + 2 * patch, 2 * b:2 * b + 2 * patch] for k, a, b in zip(i, y, x)])
        if rng.random() < 0.5:
            lo, hi = lo.flip(-1), hi.flip(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (net(lo.contiguous(memory_format=torch.channels_last)).float() - hi).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                out = torch.cat([net(val_decoded[k:k + 5]).float() for k in range(0, len(val_decoded), 5)])
            print(f"step {step}: 2x {mean_psnr(out, val_gt):.3f} dB "
                  f"({(time.perf_counter() - t0) / step:.2f} s a step)", flush=True)


if __name__ == "__main__":
    main()

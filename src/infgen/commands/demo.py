"""`infgen demo` (the `make demo` job): upscale the bundled sample photos to several sizes, with timings.

For each sample and each target size the photo is centre-cropped to the target's aspect ratio at its own
resolution (shrunk by area to at most 512^2 px: an SD-1.5 image, whose 64^2 latent is what a diffusion model
hands its decoder), encoded, and decoded by InfGen at the target size: the diffusion-latent-to-any-size use
of the paper. The bundled samples are 512 px wide, so they go in as they are (512x288 for 16:9).
Writes, into --output:
    <sample>_<W>x<H>_input.png     the low-resolution input
    <sample>_<W>x<H>_bicubic.png   a bicubic resize of it (the baseline)
    <sample>_<W>x<H>_infgen.png    the InfGen output
    timings.md, timings.json       size, seconds, megapixels/s per decode (also printed)
Without sample photos it decodes a random latent instead; without the bundled weights it uses a randomly
initialised `small` model (timings only, the images are noise) and says so everywhere.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .. import images
from .. import pipeline as pipeline_module
from ..checkpoint import atomic_write_bytes
from ..config import InfGenConfig
from ..model import InfGen
from ..images import tensor_to_pil
from ..pipeline import BundleInfo, InfGenPipeline
from ..utils import DTYPES
from . import common

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
# (height, width): full HD, 4K UHD, and a 4:1 panorama (the bundled default: 4K in ~6 s on 2 CPU cores, bf16).
DEFAULT_SIZES = [(1080, 1920), (2160, 3840), (512, 2048)]
INPUT_SIDE = 512         # inputs are at most INPUT_SIDE^2 px (by area); smaller photos are never enlarged
HEAVY_PIXELS = 4_000_000  # sizes above this run for the first sample only, so `make demo` takes minutes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, default=Path("outputs/demo"), help="output folder")
    parser.add_argument("--checkpoint", metavar="DIR", default=None,
                        help="bundle or InfGen checkpoint directory (default: the bundled weights)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    common.add_dtype_argument(parser)
    # Test/CI knobs: smaller sizes and another samples folder keep the test fast.
    parser.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=Path, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    sizes = common.parse_sizes(args.sizes) if args.sizes else DEFAULT_SIZES
    device = common.pick_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)                   # auto: printed in the table's notes
    pipe, weights, trained = _load(args.checkpoint, device, dtype)
    samples_dir = args.samples if args.samples is not None else SAMPLES
    samples = sorted(p for p in samples_dir.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")) \
        if samples_dir.is_dir() else []
    notes = [] if trained else [
        "UNTRAINED WEIGHTS: the bundled default (src/infgen/assets/default/) is not installed, so a randomly "
        "initialised `small` InfGen decodes a random latent. The images are noise; only the timings mean "
        "something."]
    if pipe.codec is None:  # nothing to encode the photos with
        if trained:
            notes.append(f"{weights} has no encoder: decoding a random latent instead of upscaling the samples.")
        samples = []
    elif trained and not samples:
        notes.append(f"no sample photos in {samples_dir}: decoding a random latent instead.")
    for line in notes:
        print(f"infgen demo: {line}")
    print(f"infgen demo: weights: {weights}; device: {device}; torch threads: {torch.get_num_threads()}")

    args.output.mkdir(parents=True, exist_ok=True)
    pipe.decode(_random_latent(pipe, 8, 8), 64, 64)   # warm-up, so the first row is not charged for it
    rows = []
    if samples:
        for k, sample in enumerate(samples):
            photo = images.open_rgb(sample)
            for height, width in sizes:
                if k > 0 and height * width > HEAVY_PIXELS:
                    continue
                small = demo_input(photo, height, width, INPUT_SIDE)
                name = f"{sample.stem}_{width}x{height}"
                t0 = time.perf_counter()
                out = pipe.upscale(small, height, width, progress=True)
                rows.append(_row(f"{sample.name} {small.width}x{small.height}", height, width,
                                 time.perf_counter() - t0, f"{name}_infgen.png"))
                images.save_image(small, args.output / f"{name}_input.png")
                images.save_image(small.resize((width, height), Image.BICUBIC), args.output / f"{name}_bicubic.png")
                images.save_image(out, args.output / f"{name}_infgen.png")
                print(_table_line(rows[-1]))
    else:
        side = pipe.info.train_latent
        z = _random_latent(pipe, side, side)
        for height, width in sizes:
            t0 = time.perf_counter()
            out = pipe.decode(z, height, width, progress=True)
            name = f"random_{width}x{height}.png"
            rows.append(_row(f"random latent {'x'.join(map(str, z.shape[1:]))}", height, width,
                             time.perf_counter() - t0, name))
            images.save_image(tensor_to_pil(out[0]), args.output / name)
            print(_table_line(rows[-1]))

    report = {"weights": weights, "trained": trained, "notes": notes, "device": str(device),
              "dtype": dtype + (" (auto)" if args.dtype == "auto" else ""), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "rows": rows}
    table = _markdown(report)
    atomic_write_bytes(args.output / "timings.json", json.dumps(report, indent=2).encode())
    atomic_write_bytes(args.output / "timings.md", table.encode())
    print()
    print(table, end="")
    print(f"infgen demo: wrote {len(rows)} image(s), timings.md and timings.json to {args.output}")
    return 0


def _load(checkpoint, device, dtype: str = "fp32") -> tuple[InfGenPipeline, str, bool]:
    """(pipeline, description, trained). Falls back to random weights only when no bundle is installed."""
    if checkpoint is not None or (Path(pipeline_module.DEFAULT_BUNDLE) / "infgen").is_dir():
        pipe, what = common.load_pipeline(checkpoint, device, dtype)
        return pipe, what, True
    torch.manual_seed(0)
    model = InfGen(InfGenConfig.preset("small")).to(device, DTYPES[dtype]).eval()
    # One window covers the 64x64 latent (a 512 x 512 SD-VAE image): a plain one-pass decode is timed.
    pipe = InfGenPipeline(model, None, BundleInfo(train_latent=64))
    return pipe, "random-initialised `small` preset (UNTRAINED)", False


def _random_latent(pipe: InfGenPipeline, h: int, w: int) -> torch.Tensor:
    """Unit-variance noise in the diffusion (scaled) space, mapped back to raw latents: like a sampler's output."""
    src = pipe.codec if pipe.codec is not None else pipe.model.config
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, pipe.model.config.latent_channels, h, w, generator=g)
    return z / src.scaling_factor + src.shift_factor


def demo_input(photo: Image.Image, height: int, width: int, side: int) -> Image.Image:
    """The largest centred crop at the target's aspect, shrunk by area to about side x side px if it is
    larger (never enlarged); sides are multiples of 8."""
    aspect = width / height
    w_crop = min(photo.width, photo.height * aspect)
    h_crop = w_crop / aspect
    if w_crop * h_crop > side * side:
        w_in, h_in = round(side * math.sqrt(aspect) / 8) * 8, round(side / math.sqrt(aspect) / 8) * 8
    else:   # native resolution: floor to 8 so the crop never needs enlarging
        w_in, h_in = int(w_crop) // 8 * 8, int(h_crop) // 8 * 8
    return ImageOps.fit(photo, (max(8, w_in), max(8, h_in)), Image.LANCZOS)


def _row(source: str, height: int, width: int, seconds: float, file: str) -> dict:
    return {"input": source, "size": common.fmt_size(height, width), "height": height, "width": width,
            "seconds": round(seconds, 3), "megapixels": round(height * width / 1e6, 3),
            "megapixels_per_s": round(common.megapixels_per_s(height, width, seconds), 3), "file": file}


def _table_line(row: dict) -> str:
    return (f"| {row['input']} | {row['size']} | {row['megapixels']:.2f} | {row['seconds']:.2f} | "
            f"{row['megapixels_per_s']:.2f} | {row['file']} |")


def _markdown(report: dict) -> str:
    lines = ["# infgen demo timings", ""]
    lines += [f"> **{n}**" for n in report["notes"]] + ([""] if report["notes"] else [])
    lines += [f"Weights: {report['weights']}; device: {report['device']}, {report['dtype']}; torch {report['torch']}, "
              f"{report['threads']} threads. Seconds cover encode + decode (upscale) or decode alone "
              "(random latent), after a warm-up; PNG writing is not included.", "",
              "| input | size (WxH) | MP | seconds | MP/s | file |", "|---|---|---:|---:|---:|---|"]
    lines += [_table_line(r) for r in report["rows"]]
    return "\n".join(lines) + "\n"

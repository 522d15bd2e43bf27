"""`infgen decode LATENTS... --height H --width W -o OUT`: latents to images of any size.

    infgen decode z.safetensors --height 2160 --width 3840 -o out.png
    infgen decode latents/ --height 1024 --width 1024 -o images/      # a folder in, a folder out

Latents: .safetensors (one tensor, or one named "latents"), .npy (no pickles), .pt (torch.load with
weights_only=True only), each (C, h, w) or (B, C, h, w) in the VAE's raw (unscaled) space; B > 1 writes
OUT_<i>.png. Everything is validated before the first decode; decoding goes through InfGenPipeline.decode.
"""
from __future__ import annotations

import argparse
import time

from ..model import check_latents, check_size
from ..images import save_image, tensor_to_pil
from . import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("latents", nargs="+", metavar="LATENTS",
                        help="latent files (.safetensors, .npy, .pt) or folders of them")
    parser.add_argument("--height", type=int, required=True, help="output height in pixels")
    parser.add_argument("--width", type=int, required=True, help="output width in pixels")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output image (.png, .jpg, ...); a folder for several inputs, a folder input, or a name "
                             "without a suffix")
    common.add_decode_arguments(parser)


def run(args: argparse.Namespace) -> int:
    kwargs = common.decode_kwargs(args)
    height, width = check_size(args.height, args.width, kwargs["max_pixels"])
    files, from_folder = common.expand_inputs(args.latents, common.LATENT_SUFFIXES, "latent files")
    latents = [common.read_latents(f) for f in files]          # small: read them all before any work
    plan = common.plan_outputs(args.output, [(f, z.shape[0]) for f, z in zip(files, latents)], from_folder)

    pipe, what = common.load_pipeline(args.checkpoint, common.pick_device(args.device), args.dtype)
    for f, z in zip(files, latents):
        try:
            check_latents(z, pipe.model.config.latent_channels)  # channels, NaN/Inf: the model's own rules
        except (ValueError, TypeError) as e:
            raise type(e)(f"{f}: {e}") from None
    if not args.quiet:
        print(f"infgen decode: {len(files)} file(s) -> {width}x{height} with {what}")

    for f, z, outs in zip(files, latents, plan):
        t0 = time.perf_counter()
        decoded = pipe.decode(z, height, width, **kwargs)        # (B, 3, H, W) in [-1, 1]
        seconds = time.perf_counter() - t0
        for image, out in zip(decoded, outs):
            save_image(tensor_to_pil(image), out)
            if not args.quiet:
                print(f"{out}  {width}x{height}  {seconds:.2f} s  "
                      f"{common.megapixels_per_s(height, width, seconds / len(outs)):.2f} MP/s")
    return 0

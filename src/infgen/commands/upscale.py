"""`infgen upscale IMAGE... (--scale S | --size WxH | --height H --width W) -o OUT`: re-render images.

    infgen upscale photo.jpg --size 3840x2160 -o photo_4k.png
    infgen upscale photos/ --scale 4 -o big/

Each image is encoded at its own size by the bundle's frozen encoder and decoded by InfGen at the new size
(InfGenPipeline.upscale); beyond the trained scale the pipeline extrapolates (decode, re-encode, decode).
"""
from __future__ import annotations

import argparse
import math
import time

from .. import images
from ..model import check_size
from . import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of them")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--scale", type=float, help="multiply the input size by S (rounded to whole pixels)")
    size.add_argument("--size", metavar="WxH", help="output WIDTHxHEIGHT, e.g. 3840x2160")
    size.add_argument("--height", type=int, help="output height in pixels (with --width)")
    parser.add_argument("--width", type=int, help="output width in pixels (with --height)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output image (.png, .jpg, ...); a folder for several inputs, a folder input, or a name "
                             "without a suffix")
    parser.add_argument("--max-input-pixels", type=int, default=images.MAX_INPUT_PIXELS, metavar="N",
                        help=f"refuse inputs above N pixels (decompression-bomb guard, default "
                             f"{images.MAX_INPUT_PIXELS})")
    common.add_decode_arguments(parser)


def target_size(args: argparse.Namespace, height: int, width: int) -> tuple[int, int]:
    """Output (height, width) for an input of (height, width), from --scale / --size / --height+--width."""
    if args.scale is not None:
        if not math.isfinite(args.scale) or args.scale <= 0:
            raise ValueError(f"--scale must be a positive number, got {args.scale}")
        return round(height * args.scale), round(width * args.scale)
    if args.size is not None:
        return common.parse_size(args.size)
    return args.height, args.width


def run(args: argparse.Namespace) -> int:
    if (args.height is None) != (args.width is None):
        raise ValueError("--height and --width go together (or use --size WxH / --scale S)")
    common.positive_int("--max-input-pixels", args.max_input_pixels)
    kwargs = common.decode_kwargs(args)
    files, from_folder = common.expand_inputs(args.images, images.IMAGE_SUFFIXES, "images")
    sizes = []
    for f in files:                                   # decode every input once up front: fail before writing
        with images.open_rgb(f, args.max_input_pixels) as im:
            w, h = im.size
        H, W = target_size(args, h, w)
        try:
            sizes.append(check_size(H, W, kwargs["max_pixels"]))
        except ValueError as e:
            raise ValueError(f"{f} ({w}x{h}) -> {W}x{H}: {e}") from None
    plan = common.plan_outputs(args.output, [(f, 1) for f in files], from_folder)

    pipe, what = common.load_pipeline(args.checkpoint, common.pick_device(args.device), args.dtype)
    if pipe.codec is None:
        raise ValueError(f"upscale needs an encoder, and {what} has none; pass a bundle directory "
                         "(infgen/ + codec/) as --checkpoint")
    if not args.quiet:
        print(f"infgen upscale: {len(files)} image(s) with {what}")

    for f, (H, W), (out,) in zip(files, sizes, plan):
        image = images.open_rgb(f, args.max_input_pixels)
        t0 = time.perf_counter()
        result = pipe.upscale(image, H, W, **kwargs)   # encode at its own size, decode at (H, W)
        seconds = time.perf_counter() - t0
        images.save_image(result, out)
        if not args.quiet:
            print(f"{out}  {image.width}x{image.height} -> {W}x{H}  {seconds:.2f} s  "
                  f"{common.megapixels_per_s(H, W, seconds):.2f} MP/s")
    return 0

"""PSNR of the pipeline's own mechanisms on the validation split: window decoding (latents larger than the
training latents) and training-free extrapolation (scales beyond the trained 4x), which `infgen eval`'s
256^2-input rows never reach. Used to check that a faster window blend or extrapolation schedule leaves
quality unchanged (issue 16: within 0.05 dB): run it before and after a change, or with --max-step-scale.

    python scripts/pipeline_quality.py                         # bundled default, --dtype auto
    python scripts/pipeline_quality.py --max-step-scale 4      # another extrapolation schedule
"""
import argparse
import time
from pathlib import Path

import torch

from infgen.commands.common import load_pipeline
from infgen.evaluate import protocol_pair
from infgen.images import pil_to_tensor, tensor_to_pil
from infgen.metrics import psnr

# (name, input height, input width, output height, output width): what each row exercises
CASES = [("windows 2x", 512, 512, 1024, 1024),          # 64^2 latent: 2 x 2 windows
         ("windows 3.75x", 288, 512, 1080, 1920),       # the demo's 1080p from a 512 x 288 photo
         ("input not 8k, 3x", 300, 300, 900, 900),      # the encoder pads 300 to 304
         ("extrapolation 6x", 128, 128, 768, 768),      # steps 128 -> ~233 -> ~423 -> 768
         ("extrapolation 8x", 128, 128, 1024, 1024)]    # 16^2 latent, 8x > the trained 4x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="bundle directory (default: the bundled one)")
    ap.add_argument("--split", type=Path, default=Path("data/splits/val.txt"))
    ap.add_argument("--root", type=Path, default=Path("data/photos"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-step-scale", type=float, default=None, help="override the bundle's value")
    ap.add_argument("--max-scale", type=float, default=None, help="override the bundle's value (where "
                    "extrapolation starts; a large value decodes every scale in one pass)")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    a = ap.parse_args()
    pipe, what = load_pipeline(a.checkpoint, torch.device("cpu"), a.dtype)
    if a.max_step_scale:
        pipe.info.max_step_scale = a.max_step_scale
    if a.max_scale:
        pipe.info.max_scale = a.max_scale
    photos = [a.root / line.strip() for line in a.split.read_text().splitlines() if line.strip()]
    print(f"{what}; max_scale {pipe.info.max_scale}, max_step_scale {pipe.info.max_step_scale}; {len(photos)} photos")
    print("| case | photos | PSNR (dB) | seconds |\n|---|---:|---:|---:|")
    for name, ih, iw, oh, ow in CASES:
        if a.cases and name not in a.cases.split(","):
            continue
        scores, seconds = [], 0.0
        for path in photos:
            pair = protocol_pair(path, (ih, iw), oh, ow)
            if pair is None:
                continue
            x, gt = pair
            t = time.perf_counter()
            out = pil_to_tensor(pipe.upscale(tensor_to_pil(x[0]), oh, ow))   # as `infgen upscale` runs
            seconds += time.perf_counter() - t
            scores.append(psnr((out + 1) / 2, (gt + 1) / 2).item())
        print(f"| {name} | {len(scores)} | {sum(scores) / len(scores):.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()

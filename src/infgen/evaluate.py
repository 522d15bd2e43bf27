"""`infgen eval`: InfGen against the obvious baseline on the same latents, on the fixed validation split.

Protocol (per validation photo, per target):
  crop   = the largest centred crop of the target's aspect ratio
  target = crop resized (Lanczos, downsampling only) to the target size  -- the ground truth
  input  = crop resized to input_size x input_size, encoded by the frozen encoder -> latent z
  InfGen               = pipe.decode(z, H, W)
  autoencoder + resize = codec.decode(z) (native 8x size), then bicubic / Lanczos to (H, W): the paper's
                         baseline on the same latent
  bicubic / Lanczos    = the input image itself resized to (H, W): what a person upscaling a photo does
Metrics: PSNR and SSIM per image; KID and patch-FID on random native-resolution patches (patch x patch
pixels, never resized before cropping), Inception-v3 features; the lattice ratio at upscales by an
integer factor >= 2 (metrics.lattice_differences: latent-cell borders against the other token borders,
pooled over the photos; compare it with the bicubic row's). Photos too small for a target are skipped and
counted (the ground truth is never upsampled).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import atomic_write_bytes
from .metrics import InceptionFeatures, fid_from_features, kid_from_features, lattice_differences, psnr, ssim
from .images import open_rgb, pil_to_tensor, tensor_to_pil
from .pipeline import InfGenPipeline

METHODS = ("infgen", "ae+bicubic", "ae+lanczos", "bicubic", "lanczos")
LABELS = {"infgen": "**InfGen**", "ae+bicubic": "AE + bicubic", "ae+lanczos": "AE + Lanczos",
          "bicubic": "bicubic of the input", "lanczos": "Lanczos of the input"}


def centre_crop(im: Image.Image, aspect: float) -> tuple[int, int, int, int]:
    """Box of the largest centred crop with width / height = aspect."""
    w, h = im.size
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def protocol_pair(path: Path, input_size: int | tuple[int, int], height: int, width: int):
    """(input, ground truth) of one photo under this protocol, (1, 3, s, s) and (1, 3, H, W) in [-1, 1];
    None when the photo is too small for the target (the ground truth is never upsampled).
    input_size: s, or (h, w) for an input of the target's aspect rather than a square."""
    ih, iw = input_size if isinstance(input_size, tuple) else (input_size, input_size)
    im = open_rgb(path, max_pixels=None)
    box = centre_crop(im, width / height)
    if box[2] - box[0] < width or box[3] - box[1] < height:
        return None
    return (pil_to_tensor(im.resize((iw, ih), Image.LANCZOS, box=box)),
            pil_to_tensor(im.resize((width, height), Image.LANCZOS, box=box)))


def validation_pairs(photos: list[Path], input_size: int, scale: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """protocol_pair of each photo for a square target of input_size * scale px; too small ones left out."""
    side = input_size * scale
    return [pair for path in photos if (pair := protocol_pair(path, input_size, side, side)) is not None]


def _resize(x: torch.Tensor, h: int, w: int, method: str) -> torch.Tensor:
    if x.shape[-2:] == (h, w):
        return x
    if method == "bicubic":
        return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    return pil_to_tensor(tensor_to_pil(x[0]).resize((w, h), Image.LANCZOS)).to(x.device)


def _patches(x: torch.Tensor, size: int, count: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` random size x size patches of a (1, 3, H, W) image at native resolution, in [0, 1]."""
    H, W = x.shape[-2:]
    size = min(size, H, W)
    ys = rng.integers(0, H - size + 1, count)
    xs = rng.integers(0, W - size + 1, count)
    return torch.cat([x[:, :, y:y + size, x0:x0 + size] for y, x0 in zip(ys, xs)]) * 0.5 + 0.5


def evaluate(pipe: InfGenPipeline, photos: list[Path], targets: list[tuple[str, int, int]], *, input_size: int = 256,
             patch: int = 128, patches_per_image: int = 8, fid: bool = True, crops_dir: Path | None = None,
             seed: int = 0, progress: bool = True) -> dict:
    """targets: (name, H, W). Returns {name: {method: {psnr, ssim, kid, kid_std, fid, n_images, n_patches}}}."""
    if pipe.codec is None:
        raise ValueError("evaluation needs a bundle with a codec (encoder + native decoder)")
    inception = InceptionFeatures() if fid else None
    results: dict = {}
    from tqdm.auto import tqdm
    for name, H, W in targets:
        rng = np.random.default_rng(seed)
        scores = {m: {"psnr": [], "ssim": [], "lattice": []} for m in METHODS}
        latent_cell = (H / (input_size // 8), W / (input_size // 8))           # px per latent cell
        lattice = all(c == int(c) and c % 8 == 0 and c > 8 for c in latent_cell)
        feats = {m: [] for m in (*METHODS, "real")}
        skipped, seconds = 0, 0.0
        for i, path in enumerate(tqdm(photos, desc=f"eval {name}", disable=not progress)):
            pair = protocol_pair(path, input_size, H, W)
            if pair is None:
                skipped += 1
                continue
            inp, gt = pair
            z = pipe.encode(inp.to(pipe.device))
            t0 = time.perf_counter()
            out = {"infgen": pipe.decode(z, H, W).float().cpu()}
            seconds += time.perf_counter() - t0
            native = pipe.codec.decode(z).float().cpu()
            out["ae+bicubic"] = _resize(native, H, W, "bicubic")
            out["ae+lanczos"] = _resize(native, H, W, "lanczos")
            out["bicubic"] = _resize(inp, H, W, "bicubic")
            out["lanczos"] = _resize(inp, H, W, "lanczos")
            gt01 = gt * 0.5 + 0.5
            for m, x in out.items():
                scores[m]["psnr"].append(float(psnr(x * 0.5 + 0.5, gt01)[0]))
                scores[m]["ssim"].append(float(ssim(x * 0.5 + 0.5, gt01)[0]))
                if lattice:
                    period = (int(latent_cell[0]), int(latent_cell[1]))
                    scores[m]["lattice"].append(lattice_differences(x * 0.5 + 0.5, period)[0].tolist())
            if inception is not None:
                state = rng.bit_generator.state  # the same patch positions for every method
                for m, x in [("real", gt), *out.items()]:
                    rng.bit_generator.state = state
                    feats[m].append(inception(_patches(x, patch, patches_per_image, rng)).numpy())
            if crops_dir is not None and i < 2:
                _save_comparison(crops_dir / f"{name}_{path.stem}.png", gt, out, patch)
        n = len(photos) - skipped
        entry = {"size": [H, W], "n_images": n, "skipped_too_small": skipped,
                 "infgen_decode_s_per_image": seconds / max(n, 1)}
        for m in METHODS:
            entry[m] = {"psnr": float(np.mean(scores[m]["psnr"])) if n else None,
                        "ssim": float(np.mean(scores[m]["ssim"])) if n else None,
                        "lattice": None}
            if lattice and n:                                 # pooled: mean across-cell / mean across-token
                cell, other = np.mean(scores[m]["lattice"], axis=0)
                entry[m]["lattice"] = float(cell / other)
            if inception is not None and n:
                real, fake = np.concatenate(feats["real"]), np.concatenate(feats[m])
                entry[m]["kid"], entry[m]["kid_std"] = kid_from_features(real, fake, subset_size=min(100, len(real)))
                entry[m]["patch_fid"] = fid_from_features(real, fake)
                entry[m]["n_patches"] = len(real)
        results[name] = entry
    return results


def _save_comparison(path: Path, gt, out: dict, size: int) -> None:
    """Side by side: ground truth | bicubic of the input | AE + bicubic | InfGen, a centred crop at native size."""
    H, W = gt.shape[-2:]
    s = min(size * 2, H, W)
    y, x = (H - s) // 2, (W - s) // 2
    panels = [gt] + [out[m] for m in ("bicubic", "ae+bicubic", "infgen")]
    row = torch.cat([p[:, :, y:y + s, x:x + s] for p in panels], dim=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_pil(row[0]).save(path)


def to_markdown(results: dict, meta: dict) -> str:
    patches = (f"KID x1000 and patch-FID on {meta['patch']} px native patches ({meta['patches_per_image']} per "
               "image)" if meta.get("fid", True) else "KID and patch-FID not computed (--no-fid)")
    lines = [f"Validation photos: {meta['n_photos']} ({meta['split']}); input {meta['input_size']}^2 -> latent "
             f"{meta['input_size'] // 8}^2; {patches}. Bundle: {meta['checkpoint']}.", "",
             "Lattice: mean |step| across latent-cell borders / across the other 8-px token borders (1 = none; "
             "compare with the bicubic row, whose JPEG-derived input has its own).", "",
             "| target | method | PSNR (dB) ↑ | SSIM ↑ | KID×1000 ↓ | patch-FID ↓ | lattice |",
             "|---|---|---|---|---|---|---|"]
    for name, e in results.items():
        for m in METHODS:
            if m in ("bicubic", "lanczos") and e["size"] == [meta["input_size"]] * 2:
                continue                                  # at 1x a resize of the input is the ground truth
            r = e[m]
            fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
            kid = None if r.get("kid") is None else r["kid"] * 1000
            lines.append(f"| {name} ({e['size'][1]}x{e['size'][0]}, n={e['n_images']}) | {LABELS[m]} | "
                         f"{fmt(r['psnr'], '.2f')} | {fmt(r['ssim'], '.4f')} | {fmt(kid, '.2f')} | "
                         f"{fmt(r.get('patch_fid'), '.1f')} | {fmt(r.get('lattice'), '.3f')} |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="bundle directory (default: the bundled model)")
    p.add_argument("--split", default="data/splits/val.txt", help="validation list (names under --root)")
    p.add_argument("--root", default="data/photos", help="photo folder (`infgen data photos` writes it)")
    p.add_argument("--input-size", type=int, default=256)
    p.add_argument("--scales", default="1,2,4", help="square targets at input_size * scale")
    p.add_argument("--nonsquare", default="1024x576", help="one extra WxH target ('' for none)")
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--patches-per-image", type=int, default=8)
    p.add_argument("--no-fid", action="store_true", help="PSNR/SSIM only (no Inception)")
    p.add_argument("--limit", type=int, default=None, help="first N photos only (quick checks)")
    p.add_argument("--out", default="docs/eval", help="writes results.json, results.md and crops/")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def run(args: argparse.Namespace) -> int:
    from .data import read_split

    photos = read_split(args.split, args.root)
    missing = [p for p in photos if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} validation photos missing (e.g. {missing[0]}); run `infgen data photos`")
    photos = photos[: args.limit] if args.limit else photos
    try:
        scales = [float(s) for s in args.scales.split(",") if s]
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers, got {args.scales!r}") from None
    targets = [(f"{s:g}x", round(args.input_size * s), round(args.input_size * s)) for s in scales]
    if args.nonsquare:
        w, _, h = args.nonsquare.partition("x")
        if not (w.isdigit() and h.isdigit()) or int(w) < 1 or int(h) < 1:
            raise ValueError(f"--nonsquare must be WxH with positive ints, got {args.nonsquare!r}")
        targets.append((f"{w}x{h}", int(h), int(w)))
    pipe = InfGenPipeline.from_pretrained(args.checkpoint, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = evaluate(pipe, photos, targets, input_size=args.input_size, patch=args.patch,
                       patches_per_image=args.patches_per_image, fid=not args.no_fid, crops_dir=out / "crops")
    meta = {"split": args.split, "n_photos": len(photos), "fid": not args.no_fid, "input_size": args.input_size, "patch": args.patch,
            "patches_per_image": args.patches_per_image, "checkpoint": args.checkpoint or "bundled default",
            "command": "infgen " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "infgen eval (API)"}
    atomic_write_bytes(out / "results.json", json.dumps({"meta": meta, "results": results}, indent=2).encode())
    md = to_markdown(results, meta)
    atomic_write_bytes(out / "results.md", md.encode())
    print(md)
    return 0

"""`infgen eval`: InfGen against the obvious baselines on the same latents, on the fixed validation split.

The protocol is written down in docs/eval/PROTOCOL.md. In short, per validation photo, per target:
  crop   = the largest centred crop of the target's aspect ratio
  target = crop resized (Lanczos, downsampling only) to the target size  -- the ground truth
  input  = crop resized to input_size x input_size, encoded by the frozen encoder -> latent z
  InfGen               = pipe.decode(z, H, W)
  autoencoder + resize = codec.decode(z) (native 8x size), then bicubic / Lanczos to (H, W): the paper's
                         baseline on the same latent
  bicubic / Lanczos    = the input image itself resized to (H, W): what a person upscaling a photo does
                         (left out at 1x, where it is the ground truth)
Metrics (metrics.py; torchmetrics for PSNR, SSIM, MS-SSIM, FID, KID): PSNR, SSIM and MS-SSIM per image;
KID, patch-FID, sFID and precision / recall on native-resolution tiles (a centred grid of non-overlapping
patch x patch tiles, never resized before cropping; up to patches_per_image of them per photo, the same
tiles for every method), Inception-v3 features; the lattice ratio at upscales by an integer factor >= 2.
Sampling noise: a bootstrap over the photos (the same draws for every method) gives a percentile interval
for PSNR and KID and for InfGen's paired difference with each baseline (PSNR, KID, patch-FID). Photos too
small for a target are skipped and counted (the ground truth is never upsampled).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import atomic_write_bytes
from .images import open_rgb, pil_to_tensor, tensor_to_pil
from .metrics import (InceptionFeatures, bootstrap_counts, grams, image_scores, interval, kid, kid_parts,
                      lattice_differences, precision_recall, weighted_fid)
from .metrics import fid as frechet_distance
from .pipeline import InfGenPipeline

METHODS = ("infgen", "ae+bicubic", "ae+lanczos", "bicubic", "lanczos")
BASELINES = METHODS[1:]
LABELS = {"infgen": "**InfGen**", "ae+bicubic": "AE + bicubic", "ae+lanczos": "AE + Lanczos",
          "bicubic": "bicubic of the input", "lanczos": "Lanczos of the input"}
SHORT = {"psnr": "PSNR", "kid": "KID", "patch_fid": "pFID"}
LEVEL = 0.95


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


def tile_positions(height: int, width: int, size: int, count: int,
                   rng: np.random.Generator) -> tuple[int, list[tuple[int, int]]]:
    """The patch protocol: the centred grid of non-overlapping size x size tiles of a height x width image
    (size shrinks to the short side when the image is smaller), and `count` of its tiles drawn without
    replacement when the grid has more. Returns (size, [(top, left), ...]) in grid order."""
    size = min(size, height, width)
    ny, nx = height // size, width // size
    oy, ox = (height - ny * size) // 2, (width - nx * size) // 2
    grid = [(oy + i * size, ox + j * size) for i in range(ny) for j in range(nx)]
    if count < len(grid):
        grid = [grid[k] for k in sorted(rng.choice(len(grid), count, replace=False))]
    return size, grid


def _tiles(x: torch.Tensor, size: int, positions: list[tuple[int, int]]) -> torch.Tensor:
    """The tiles of a (1, 3, H, W) image in [-1, 1], as (n, 3, size, size) in [0, 1]."""
    return torch.cat([x[:, :, y:y + size, x0:x0 + size] for y, x0 in positions]) * 0.5 + 0.5


def _methods_for(H: int, W: int, input_size: int) -> tuple[str, ...]:
    # at 1x a resize of the input is the ground truth itself: nothing to measure
    if (H, W) != (input_size, input_size):
        return METHODS
    return tuple(m for m in METHODS if m not in ("bicubic", "lanczos"))


def collect(pipe: InfGenPipeline, photos: list[Path], H: int, W: int, *, input_size: int = 256, patch: int = 256,
            patches_per_image: int = 16, inception: InceptionFeatures | None = None, crops_dir: Path | None = None,
            name: str = "eval", seed: int = 0, progress: bool = True) -> dict:
    """Decode every photo at (H, W) with each method; per-image scores and, with an Inception, the tile
    features. Returns {"methods", "n_images", "skipped_too_small", "seconds", "scores": {method: {psnr: [...],
    ssim: [...], ms_ssim: [...] or None, lattice: [...]}}, "features": {"real" / method: {"pool": (N, 2048),
    "spatial": (N, 2023)}}, "patch_image": (N,) photo index of each tile, "patch": tile size}."""
    from tqdm.auto import tqdm
    rng = np.random.default_rng(seed)
    methods = _methods_for(H, W, input_size)
    latent_cell = (H / (input_size // 8), W / (input_size // 8))           # px per latent cell
    lattice = all(c == int(c) and c % 8 == 0 and c > 8 for c in latent_cell)
    scores = {m: {"psnr": [], "ssim": [], "ms_ssim": [], "lattice": []} for m in methods}
    feats: dict = {m: {"pool": [], "spatial": []} for m in ("real", *methods)}
    patch_image: list[int] = []
    skipped, seconds, n, size = 0, 0.0, 0, patch
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
        if "bicubic" in methods:
            out["bicubic"] = _resize(inp, H, W, "bicubic")
            out["lanczos"] = _resize(inp, H, W, "lanczos")
        gt01 = gt * 0.5 + 0.5
        for m, x in out.items():
            s = image_scores(x * 0.5 + 0.5, gt01)
            for key in ("psnr", "ssim", "ms_ssim"):
                scores[m][key].append(None if s[key] is None else float(s[key][0]))
            if lattice:
                period = (int(latent_cell[0]), int(latent_cell[1]))
                scores[m]["lattice"].append(lattice_differences(x * 0.5 + 0.5, period)[0].tolist())
        if inception is not None:             # the same tiles for the ground truth and every method
            size, positions = tile_positions(H, W, patch, patches_per_image, rng)
            for m, x in [("real", gt), *out.items()]:
                pool, spatial = inception.pool_and_spatial(_tiles(x, size, positions))
                feats[m]["pool"].append(pool.double().numpy())
                feats[m]["spatial"].append(spatial.double().numpy())
            patch_image += [n] * len(positions)
        if crops_dir is not None and i < 2:
            _save_comparison(crops_dir / f"{name}_{path.stem}.png", gt, out)
        n += 1
    features = None
    if inception is not None and n:
        features = {m: {k: np.concatenate(v) for k, v in d.items()} for m, d in feats.items()}
    return {"methods": methods, "n_images": n, "skipped_too_small": skipped, "seconds": seconds, "scores": scores,
            "features": features, "patch_image": np.asarray(patch_image, dtype=np.int64), "patch": size}


def _verdict(diff_draws: np.ndarray, higher_is_better: bool) -> dict:
    ci = interval(diff_draws, LEVEL)
    finite = diff_draws[np.isfinite(diff_draws)]
    if ci is None:
        return {"ci": None, "infgen_better_fraction": None, "verdict": "not resolved"}
    lo, hi = ci
    better = lo > 0 if higher_is_better else hi < 0
    worse = hi < 0 if higher_is_better else lo > 0
    wins = finite > 0 if higher_is_better else finite < 0
    return {"ci": ci, "infgen_better_fraction": float(np.mean(wins)),
            "verdict": "better" if better else "worse" if worse else "not resolved"}


def _finite(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def summarize(data: dict, *, draws: int = 1000, seed: int = 0, precision_k: int = 3) -> dict:
    """Point estimates (torchmetrics) and bootstrap intervals over the photos of one target's `collect`."""
    n, methods = data["n_images"], data["methods"]
    entry: dict = {"n_images": n, "skipped_too_small": data["skipped_too_small"],
                   "infgen_decode_s_per_image": data["seconds"] / max(n, 1), "bootstrap_draws": draws}
    counts = bootstrap_counts(n, draws, seed) if n else None       # (draws, n): the same draws for all methods
    boot: dict = {}
    feats = data["features"]
    if feats is not None and len(data["patch_image"]) < 2:
        feats = None                                               # FID / KID need two tiles at least
    if feats is not None:
        entry["n_patches"] = int(len(data["patch_image"]))
        entry["patch"] = int(data["patch"])
        patch_counts = counts[:, data["patch_image"]]              # a tile counts as often as its photo
    for m in methods:
        s = data["scores"][m]
        r: dict = {"psnr": None, "psnr_ci": None, "ssim": None, "ms_ssim": None, "lattice": None}
        boot[m] = {}
        if n:
            p = np.asarray(s["psnr"])
            r["psnr"] = float(p.mean())
            boot[m]["psnr"] = counts @ p / n
            r["psnr_ci"] = interval(boot[m]["psnr"], LEVEL)
            r["ssim"] = float(np.mean(s["ssim"]))
            r["ms_ssim"] = None if s["ms_ssim"][0] is None else float(np.mean(s["ms_ssim"]))
            if s["lattice"]:                                       # pooled: mean across-cell / mean across-token
                cell, other = np.mean(s["lattice"], axis=0)
                r["lattice"] = float(cell / other)
        if feats is not None:
            real, fake = feats["real"], feats[m]
            parts = kid_parts(real["pool"], fake["pool"], data["patch_image"])
            r["kid"] = _finite(kid(parts))                         # None with a single photo
            r["patch_fid"] = frechet_distance(real["pool"], fake["pool"])
            r["sfid"] = frechet_distance(real["spatial"], fake["spatial"])
            r["precision"], r["recall"] = (precision_recall(real["pool"], fake["pool"], precision_k)
                                           if len(real["pool"]) > precision_k else (None, None))
            g = grams(real["pool"], fake["pool"])
            boot[m]["kid"] = np.array([kid(parts, w) for w in patch_counts])
            boot[m]["patch_fid"] = np.array([weighted_fid(g, w) for w in patch_counts])
            r["kid_ci"] = interval(boot[m]["kid"], LEVEL)
            r["n_patches"] = int(len(real["pool"]))
        entry[m] = r
    if n:                                # InfGen minus each baseline, draw by draw: a claim with a confidence
        entry["infgen_vs"] = {}
        for b in methods[1:]:
            d: dict = {}
            for key, higher in (("psnr", True), ("kid", False), ("patch_fid", False)):
                if key in boot["infgen"]:
                    a, c = entry["infgen"][key], entry[b][key]
                    d[key] = {"diff": None if a is None or c is None else a - c,
                              **_verdict(boot["infgen"][key] - boot[b][key], higher)}
            entry["infgen_vs"][b] = d
    return entry


def evaluate(pipe: InfGenPipeline, photos: list[Path], targets: list[tuple[str, int, int]], *, input_size: int = 256,
             patch: int = 256, patches_per_image: int = 16, fid: bool = True, crops_dir: Path | None = None,
             seed: int = 0, draws: int = 1000, progress: bool = True) -> dict:
    """targets: (name, H, W). Returns {name: summarize(...) + {"size": [H, W]}} (see summarize)."""
    if pipe.codec is None:
        raise ValueError("evaluation needs a bundle with a codec (encoder + native decoder)")
    inception = InceptionFeatures() if fid else None
    results: dict = {}
    for name, H, W in targets:
        data = collect(pipe, photos, H, W, input_size=input_size, patch=patch, patches_per_image=patches_per_image,
                       inception=inception, crops_dir=crops_dir, name=name, seed=seed, progress=progress)
        results[name] = {"size": [H, W], **summarize(data, draws=draws, seed=seed)}
    return results


def _save_comparison(path: Path, gt, out: dict, size: int = 256) -> None:
    """Side by side: ground truth | bicubic of the input | AE + bicubic | InfGen, a centred size x size crop at
    native size."""
    H, W = gt.shape[-2:]
    s = min(size, H, W)
    y, x = (H - s) // 2, (W - s) // 2
    panels = [gt] + [out[m] for m in ("bicubic", "ae+bicubic", "infgen") if m in out]
    row = torch.cat([p[:, :, y:y + s, x:x + s] for p in panels], dim=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_pil(row[0]).save(path)


def _fmt(v, f: str) -> str:
    return "—" if v is None else format(v, f)


def _with_ci(v, ci, f: str, scale: float = 1.0) -> str:
    if v is None:
        return "—"
    if ci is None:
        return format(v * scale, f)
    return f"{v * scale:{f}} [{ci[0] * scale:{f}}, {ci[1] * scale:{f}}]"


def _target_label(name: str, e: dict) -> str:
    return f"{name} ({e['size'][1]}x{e['size'][0]}, n={e['n_images']})"


def to_markdown(results: dict, meta: dict) -> str:
    features = meta.get("fid", True)
    pct = f"{round(LEVEL * 100)}%"
    if features:
        patches = (f"KID, patch-FID, sFID and precision/recall (k=3) on native-resolution tiles: the centred grid "
                   f"of {meta['patch']} px tiles, up to {meta['patches_per_image']} per image (n_patches per "
                   "target in results.json), the same tiles for every method")
    else:
        patches = "KID, patch-FID, sFID and precision/recall not computed (--no-fid)"
    lines = [f"Validation photos: {meta['n_photos']} ({meta['split']}); input {meta['input_size']}^2 -> latent "
             f"{meta['input_size'] // 8}^2; {patches}. Bundle: {meta['checkpoint']}. Protocol: "
             "docs/eval/PROTOCOL.md.", "",
             f"[lo, hi]: {pct} percentile interval of {meta.get('draws', 1000)} bootstrap draws of the photos (the "
             "same draws for every method). Lattice: mean |step| across latent-cell borders / across the other "
             "8-px token borders (1 = none; compare with the bicubic row, whose JPEG-derived input has its own).", "",
             f"| target | method | PSNR (dB) ↑ [{pct}] | SSIM ↑ | MS-SSIM ↑ | KID×1000 ↓ [{pct}] | patch-FID ↓ | "
             "lattice |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in results.items():
        if not e["n_images"]:
            lines.append(f"| {_target_label(name, e)} | no photo large enough ({e['skipped_too_small']} skipped) | "
                         "— | — | — | — | — | — |")
            continue
        for m in METHODS:
            if m not in e:
                continue                                  # at 1x a resize of the input is the ground truth
            r = e[m]
            lines.append(f"| {_target_label(name, e)} | {LABELS[m]} | {_with_ci(r['psnr'], r.get('psnr_ci'), '.2f')} | "
                         f"{_fmt(r['ssim'], '.4f')} | {_fmt(r.get('ms_ssim'), '.4f')} | "
                         f"{_with_ci(r.get('kid'), r.get('kid_ci'), '.2f', 1000)} | "
                         f"{_fmt(r.get('patch_fid'), '.1f')} | {_fmt(r.get('lattice'), '.3f')} |")
    if features:
        lines += ["", "The paper's distribution metrics on the same tiles (sFID: Inception mixed_6/conv, first 7 "
                  "channels; patch-FID is biased upwards at this sample size: compare rows of one target):", "",
                  "| target | method | sFID ↓ | precision ↑ | recall ↑ |", "|---|---|---|---|---|"]
        for name, e in results.items():
            for m in METHODS:
                if m in e and e["n_images"]:
                    r = e[m]
                    lines.append(f"| {_target_label(name, e)} | {LABELS[m]} | {_fmt(r.get('sfid'), '.1f')} | "
                                 f"{_fmt(r.get('precision'), '.3f')} | {_fmt(r.get('recall'), '.3f')} |")
    lines += ["", f"InfGen minus each baseline, draw by draw over the same bootstrap draws ({pct} interval; "
              "better / worse when the interval excludes 0, else not resolved; ΔPSNR > 0 and ΔKID, Δpatch-FID < 0 "
              "favour InfGen):", "",
              f"| target | baseline | ΔPSNR (dB) [{pct}] | ΔKID×1000 [{pct}] | Δpatch-FID [{pct}] | verdict |",
              "|---|---|---|---|---|---|"]
    for name, e in results.items():
        for b, d in e.get("infgen_vs", {}).items():
            cells, verdicts = [], []
            for key, scale, f in (("psnr", 1.0, ".2f"), ("kid", 1000.0, ".2f"), ("patch_fid", 1.0, ".1f")):
                if key in d:
                    cells.append(_with_ci(d[key]["diff"], d[key]["ci"], f, scale))
                    verdicts.append(f"{SHORT[key]} {d[key]['verdict']}")
                else:
                    cells.append("—")
            lines.append(f"| {_target_label(name, e)} | {LABELS[b]} | {' | '.join(cells)} | {'; '.join(verdicts)} |")
    return "\n".join(lines) + "\n"


def scale_of(name: str) -> float | None:
    """The output scale of a square target named like '2x' / '1.5x'; None for other targets."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)x", name)
    return float(m.group(1)) if m else None


def plot_scale_curves(results: dict, path: Path) -> Path:
    """PSNR and KID against the output scale (the square targets), one line per method, bootstrap intervals
    as error bars; each scale's tick says how many photos were large enough for it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((scale_of(k), k) for k in results if scale_of(k) is not None)
    if not rows:
        raise ValueError("the scale plot needs square targets named like '2x' (--scales)")
    keys = [("psnr", "psnr_ci", 1.0, "PSNR (dB) ↑"), ("kid", "kid_ci", 1000.0, "KID × 1000 ↓")]
    keys = [k for k in keys if any(results[name]["infgen"].get(k[0]) is not None for _, name in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, (key, ci_key, scale, label) in zip(axes[0], keys):
        for i, m in enumerate(METHODS):
            pts = [(s, results[name][m]) for s, name in rows
                   if m in results[name] and results[name][m].get(key) is not None]
            if not pts:
                continue
            xs = [s * 2 ** (0.04 * (i - 2)) for s, _ in pts]              # side by side, so the bars show
            ys = [r[key] * scale for _, r in pts]
            err = np.array([[r[key] - r[ci_key][0], r[ci_key][1] - r[key]] if r.get(ci_key) else [0, 0]
                            for _, r in pts]).T * scale
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=LABELS[m].strip("*"),
                        linewidth=2.5 if m == "infgen" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks([s for s, _ in rows])
        ax.set_xticklabels([f"{s:g}x\nn={results[name]['n_images']}" for s, name in rows])
        ax.set_xlabel("output scale (photos large enough)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"InfGen and baselines against output scale ({round(LEVEL * 100)}% bootstrap intervals)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, results: dict, meta: dict, md: str) -> Path:
    """report.md: the tables, the scale plot and the side-by-side crops."""
    parts = ["# InfGen evaluation report", "", f"`{meta['command']}`", "", md]
    if any(scale_of(k) is not None for k in results):
        plot = plot_scale_curves(results, out / "scale_curves.png")
        parts += ["", f"![PSNR and KID against output scale]({plot.name})", ""]
    crops = sorted((out / "crops").glob("*.png"))
    if crops:
        parts += ["Crops (left to right: ground truth, bicubic of the input where it is not the ground truth, "
                  "AE + bicubic, InfGen; a centred crop at native size):", ""]
        parts += [f"![{c.stem}](crops/{c.name})" for c in crops]
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(parts) + "\n").encode())
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="bundle directory (default: the bundled model)")
    p.add_argument("--split", default="data/splits/val.txt", help="validation list (names under --root)")
    p.add_argument("--root", default="data/photos", help="photo folder (`infgen data photos` writes it)")
    p.add_argument("--input-size", type=int, default=256)
    p.add_argument("--scales", default=None,
                   help="square targets at input_size * scale (default 1,2,4; with --report 1,2,4,8)")
    p.add_argument("--nonsquare", default="1024x576", help="one extra WxH target ('' for none)")
    p.add_argument("--patch", type=int, default=256, help="tile size (px, native resolution)")
    p.add_argument("--patches-per-image", type=int, default=16, help="tiles per photo at most (see PROTOCOL.md)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws over the photos")
    p.add_argument("--no-fid", action="store_true", help="PSNR/SSIM/MS-SSIM only (no Inception)")
    p.add_argument("--report", action="store_true",
                   help="also report.md with a plot of PSNR / KID against output scale (scale_curves.png)")
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
    scales_arg = args.scales if args.scales is not None else ("1,2,4,8" if args.report else "1,2,4")
    try:
        scales = [float(s) for s in scales_arg.split(",") if s]
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers, got {scales_arg!r}") from None
    if args.patches_per_image < 1 or args.patch < 8 or args.bootstrap < 1:
        raise ValueError("--patches-per-image and --bootstrap must be >= 1, --patch >= 8")
    targets = [(f"{s:g}x", round(args.input_size * s), round(args.input_size * s)) for s in scales]
    if args.nonsquare:
        w, _, h = args.nonsquare.partition("x")
        if not (w.isdigit() and h.isdigit()) or int(w) < 1 or int(h) < 1:
            raise ValueError(f"--nonsquare must be WxH with positive ints, got {args.nonsquare!r}")
        targets.append((f"{w}x{h}", int(h), int(w)))
    pipe = InfGenPipeline.from_pretrained(args.checkpoint, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = evaluate(pipe, photos, targets, input_size=args.input_size, patch=args.patch,
                       patches_per_image=args.patches_per_image, fid=not args.no_fid, crops_dir=out / "crops",
                       draws=args.bootstrap)
    meta = {"split": args.split, "n_photos": len(photos), "fid": not args.no_fid, "input_size": args.input_size,
            "patch": args.patch, "patches_per_image": args.patches_per_image, "draws": args.bootstrap,
            "level": LEVEL, "checkpoint": args.checkpoint or "bundled default", "seconds": time.perf_counter() - t0,
            "command": "infgen " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "infgen eval (API)"}
    atomic_write_bytes(out / "results.json", json.dumps({"meta": meta, "results": results}, indent=2).encode())
    md = to_markdown(results, meta)
    atomic_write_bytes(out / "results.md", md.encode())
    if args.report:
        print(f"report: {write_report(out, results, meta, md)}")
    print(md)
    return 0

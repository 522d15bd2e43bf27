"""Where training photos come from and how one becomes a sample: folders, split lists and webdataset shards;
decoding (or the photo cache) and the crop recipe (crops.py) applied to the pixels.

    files, shards = resolve_source("data/photos", root=None)   # (files, None) or (None, shard urls)
    reader = PhotoReader(recipe, cached=None)                   # cached: photo_cache entries by file
    reader.load(path_or_bytes, h, w, rng)                       # a Sample, or Skip.CORRUPT / Skip.SMALL
"""
from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image

from .crops import Crop, CropRecipe, Skip
from .images import IMAGE_SUFFIXES, to_rgb
from .photo_cache import CachedPhoto


# -- discovery -----------------------------------------------------------------------------------------------
def list_images(path: str | Path) -> list[Path]:
    """Image files (images.IMAGE_SUFFIXES, any case) below `path`, recursively, sorted."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"image folder {path} does not exist or is not a folder")
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_split(path_txt: str | Path, root: str | Path) -> list[Path]:
    """The files named in a split list (one name per line, relative to `root`; '#' comments)."""
    path_txt, root = Path(path_txt), Path(root)
    if not path_txt.is_file():
        raise ValueError(f"split list {path_txt} not found")
    names = [line.strip() for line in path_txt.read_text().splitlines()]
    return [root / n for n in names if n and not n.startswith("#")]


def resolve_source(source, root) -> tuple[list[Path] | None, list[str] | None]:
    """(files, None) for a folder / split list / list of files; (None, shard urls) for webdataset shards."""
    if isinstance(source, (list, tuple)):
        if all(Path(s).suffix.lower() in IMAGE_SUFFIXES for s in source):
            return sorted(Path(s) for s in source), None
        return None, [u for s in source for u in _expand(str(s))]
    text = str(source)
    if ".tar" in text or "{" in text or "::" in text or text.startswith(("pipe:", "http://", "https://")):
        return None, _expand(text)
    path = Path(text)
    if path.suffix == ".txt":
        return read_split(path, root if root is not None else path.parent), None
    return list_images(path), None


def _expand(urls: str) -> list[str]:
    from webdataset.shardlists import expand_urls
    return list(expand_urls(urls))


# -- shards --------------------------------------------------------------------------------------------------
def shard_stream(shards: list[str], rng: np.random.Generator, reader: int, readers: int, by_shard: bool,
                 on_corrupt: Callable[[], None], source) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) forever, one shuffled pass over `shards` after another (a permutation from `rng`
    per pass, drawn when the pass starts). by_shard=False: the shards are shared and this reader keeps
    every `readers`-th sample. Corrupt members and samples without an image call on_corrupt."""
    import webdataset as wds

    def handler(exn: Exception) -> bool:  # a corrupt tar member / shard: count it, go on
        on_corrupt()
        return True

    while True:
        order = [shards[i] for i in rng.permutation(len(shards))]
        found = 0
        ds = wds.WebDataset(order, shardshuffle=False, nodesplitter=None, workersplitter=None,
                            handler=handler, empty_check=False)
        for k, sample in enumerate(ds):
            if not by_shard and k % readers != reader:
                continue
            data = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
            if data is None:
                on_corrupt()
                continue
            found += 1
            yield sample["__key__"], data
        if not found:
            raise ValueError(f"no readable image in the shards {source}")


def write_shards(src: str | Path, pattern: str, *, per_shard: int = 1000) -> list[str]:
    """Pack every image below `src` into webdataset tar shards (printf `pattern`, e.g. "out/train-%06d.tar").
    Files are stored byte for byte as <key>.<ext>; keys are unique and stable (index + sanitised path)."""
    import webdataset as wds

    if not isinstance(per_shard, int) or per_shard < 1:
        raise ValueError(f"--per-shard must be a positive int, got {per_shard!r}")
    if "%" not in pattern:
        raise ValueError(f"shard pattern needs a printf field such as %06d, got {pattern!r}")
    files = list_images(src)
    if not files:
        raise ValueError(f"no image files (jpg, jpeg, png, webp) in {src}")
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
            for i, path in enumerate(files):
                rel = path.relative_to(src).with_suffix("").as_posix()
                key = f"{i:08d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", rel)  # '.' would split the extension
                ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
                sink.write({"__key__": key, ext: path.read_bytes()})
                if i % per_shard == 0:
                    written.append(pattern % (i // per_shard))
    return written


# -- one sample ----------------------------------------------------------------------------------------------
class Sample(NamedTuple):
    input: torch.Tensor    # (3, S, S) in [-1, 1]
    target: torch.Tensor   # (3, H, W) in [-1, 1]
    converted: bool        # the photo was not 8-bit RGB (grey, palette, alpha, CMYK, 16-bit)


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "WEBP", "PNG") else 1
    return (im.height, im.width) if orientation in (5, 6, 7, 8) else (im.width, im.height)


def open_image(data: Path | bytes) -> Image.Image | None:
    """Open lazily (header only); None if it is not an image."""
    try:
        im = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
        if im.width < 1 or im.height < 1:
            raise OSError("empty image")
        return im
    except Exception:  # PIL raises many types for bad files (UnidentifiedImageError, SyntaxError, ...)
        return None


class PhotoReader:
    """The recipe applied to one photo: from its file / bytes, or from its photo_cache pyramid."""

    def __init__(self, recipe: CropRecipe, cached: dict[Path, CachedPhoto | None] | None = None):
        self.recipe, self.cached = recipe, cached

    def load(self, data: Path | bytes, h: int, w: int, rng: np.random.Generator) -> Sample | Skip:
        if self.cached is not None:
            entry = self.cached.get(data)
            return Skip.CORRUPT if entry is None else self._from_cache(entry, h, w, rng)
        im = open_image(data)
        if im is None:
            return Skip.CORRUPT
        with im:
            return self._from_image(im, h, w, rng)

    def any_readable(self, files: list[Path]) -> bool:
        """Whether one of `files` decodes (a small draft of it)."""
        if self.cached is not None:
            return any(e is not None for e in self.cached.values())
        for path in files:
            im = open_image(path)
            if im is None:
                continue
            try:
                im.draft("RGB", (64, 64))
                im.load()
                return True
            except Exception:
                continue
        return False

    def _from_cache(self, entry: CachedPhoto, h: int, w: int, rng: np.random.Generator) -> Sample | Skip:
        """The recipe of _from_image, read from the decoded pyramid (photo_cache.py) instead of the JPEG."""
        crop = self.recipe.crop(*entry.size, h, w, rng)
        if isinstance(crop, Skip):
            return crop
        target = entry.crop(crop.box, crop.target)
        inp = target if crop.target == crop.input else entry.crop(crop.box, crop.input)
        return self._finish(target, inp, entry.converted, rng)

    def _from_image(self, im: Image.Image, h: int, w: int, rng: np.random.Generator) -> Sample | Skip:
        iw, ih = _oriented_size(im)
        crop = self.recipe.crop(iw, ih, h, w, rng)
        if isinstance(crop, Skip):
            return crop
        try:
            im, converted = _decode(im, crop, iw, ih)  # loads the pixels: corrupt / truncated files raise here
        except Exception:
            return Skip.CORRUPT
        sx, sy = im.width / iw, im.height / ih
        box = (crop.box[0] * sx, crop.box[1] * sy, crop.box[2] * sx, crop.box[3] * sy)
        assert box[3] - box[1] >= h - 0.5 and box[2] - box[0] >= w - 0.5, "crop smaller than target"
        target = im.resize(crop.target, Image.LANCZOS, box=box, reducing_gap=3.0)
        inp = target if crop.target == crop.input else im.resize(crop.input, Image.LANCZOS, box=box, reducing_gap=3.0)
        return self._finish(target, inp, converted, rng)

    def _finish(self, target: Image.Image, inp: Image.Image, converted: bool, rng: np.random.Generator) -> Sample:
        if self.recipe.flip(rng):
            target, inp = (im.transpose(Image.FLIP_LEFT_RIGHT) for im in (target, inp))
        return Sample(_to_tensor(inp), _to_tensor(target), converted)


def _decode(im: Image.Image, crop: Crop, iw: int, ih: int) -> tuple[Image.Image, bool]:
    """The photo as 8-bit RGB, oriented, and whether it needed converting. JPEG: decoded at 1/2, 1/4 or 1/8
    when that still leaves the crop >= both outputs (fast, and still downsampling only); rotated JPEGs decode
    in full, as the box is in oriented pixels and to_rgb's exif_transpose needs the oriented size."""
    x0, y0, x1, y1 = crop.box
    (w, h), (s, _) = crop.target, crop.input
    need = max(h / (y1 - y0), w / (x1 - x0), s / (y1 - y0), s / (x1 - x0)) * 1.02
    orientation = im.getexif().get(0x0112, 1) if im.format == "JPEG" else 1
    if im.format == "JPEG" and need < 0.5 and orientation == 1:
        im.draft(im.mode, (math.ceil(iw * need), math.ceil(ih * need)))
    converted = im.mode != "RGB"  # the file's own mode, read before to_rgb replaces the image
    return to_rgb(im), converted

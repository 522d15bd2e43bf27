"""Training data: multi-resolution (input, target) batches from a folder, a split list or webdataset shards.

A batch shares one target size (H, W), drawn per batch (paper, Training): area log-uniform between
out_min^2 and out_max^2, aspect ratio W/H from the given buckets. Per sample, a random crop of that aspect
ratio and a random scale; target = the crop resized to (H, W), input = the same crop resized to
(input_size, input_size) (squashed: the decoder learns to produce any aspect ratio from a square latent).
Targets are only ever DOWNsampled: a photo too small for the batch's size is skipped and counted.

    loader = make_loader("data/photos", input_size=256, out_min=256, out_max=512,
                         aspect_ratios=[0.5, 0.75, 1.0, 1.33, 2.0], batch_size=4, num_workers=2, seed=0)
    for step, batch in zip(range(steps), loader):  # infinite
        batch["input"]   # (B, 3, input_size, input_size) in [-1, 1]
        batch["target"]  # (B, 3, H, W) in [-1, 1]
        batch["key"]     # list of B source names (file paths or shard keys), for debugging
    loader.stats         # DataStats: images converted / skipped (corrupt, too small)

Determinism: a folder or split list gives the same batches for the same (seed, rank, world_size) whatever
num_workers is, and `start=k` resumes exactly at batch k. Shards are a stream: the same (seed, rank,
world_size, num_workers) gives the same batches, and `start` only reseeds.

Speed: `cache=DIR` reads decoded photo pyramids (photo_cache.py, built once) instead of decoding a 2-6K-pixel
JPEG per sample; the crop recipe is the same, the pixels differ only by the pyramid's resampling.
"""
from __future__ import annotations

import io
import math
import re
import signal
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .images import IMAGE_SUFFIXES, to_rgb
from .photo_cache import CachedPhoto, build_cache


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


@dataclass
class DataStats:
    """Counters of sample loads. Corrupt files are remembered and never retried (counted once per worker);
    a photo too small for one batch's size can still serve a later, smaller batch (counted per skip)."""
    loaded: int = 0            # samples that made it into a batch
    converted: int = 0         # of those, loaded from a non-RGB image (grey, palette, alpha, CMYK, 16-bit)
    skipped_corrupt: int = 0   # unreadable: corrupt, truncated, empty, not an image
    skipped_small: int = 0     # smaller than min_side, or than the batch's target size
    batches: int = 0

    def add(self, other: "DataStats") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def batch_size_hw(rng: np.random.Generator, out_min: int, out_max: int, aspect_ratios: Sequence[float],
                  multiple: int) -> tuple[int, int]:
    """(H, W) of one batch: area log-uniform in [out_min^2, out_max^2], W/H from the buckets, rounded to
    `multiple` (at least one multiple)."""
    ratio = float(aspect_ratios[rng.integers(len(aspect_ratios))])
    area = math.exp(rng.uniform(2 * math.log(out_min), 2 * math.log(out_max)))
    h = max(multiple, round(math.sqrt(area / ratio) / multiple) * multiple)
    w = max(multiple, round(math.sqrt(area * ratio) / multiple) * multiple)
    return h, w


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)


class MultiResDataset(torch.utils.data.IterableDataset):
    """Infinite stream of batches (dicts); use with DataLoader(batch_size=None), see make_loader."""

    def __init__(self, source, *, input_size: int, out_min: int, out_max: int, aspect_ratios: Sequence[float],
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1, min_side: int | None = None,
                 root: str | Path | None = None, start: int = 0, multiple: int = 8,
                 cache: str | Path | None = None):
        for name, v in dict(input_size=input_size, out_min=out_min, out_max=out_max, batch_size=batch_size,
                            world_size=world_size, multiple=multiple).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if out_min > out_max:
            raise ValueError(f"out_min ({out_min}) must be <= out_max ({out_max})")
        if not aspect_ratios or any(not (float(a) > 0) for a in aspect_ratios):
            raise ValueError(f"aspect_ratios must be positive numbers (W/H), got {aspect_ratios!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.input_size, self.out_min, self.out_max, self.multiple = input_size, out_min, out_max, multiple
        self.aspect_ratios = [float(a) for a in aspect_ratios]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.min_side, self.start = min_side or 0, start
        self.source = source
        self.files, self.shards = resolve_source(source, root)
        if self.files is not None:
            if not self.files:
                raise ValueError(f"no image files (jpg, jpeg, png, webp) in {source}")
            # rank r takes every world_size-th file; with fewer files than ranks every rank takes all of them
            self.files = self.files[rank::world_size] if len(self.files) >= world_size else self.files
        elif not self.shards:
            raise ValueError(f"no webdataset shards match {source}")
        self.stats = DataStats()
        self.cached: dict[Path, CachedPhoto | None] | None = None          # photo_cache entries by file
        if cache is not None and self.files is not None:
            self.cached = build_cache(self.files, cache, progress=rank == 0)

    # -- one sample ----------------------------------------------------------------------------------------
    def _open(self, data: Path | bytes) -> Image.Image | None:
        """Open lazily (header only); None if it is not an image."""
        try:
            im = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
            if im.width < 1 or im.height < 1:
                raise OSError("empty image")
            return im
        except Exception:  # PIL raises many types for bad files (UnidentifiedImageError, SyntaxError, ...)
            return None

    def _load(self, data: Path | bytes, h: int, w: int, rng: np.random.Generator):
        if self.cached is not None:
            entry = self.cached.get(data)
            return "corrupt" if entry is None else self._sample_cached(entry, h, w, rng)
        im = self._open(data)
        if im is None:
            return "corrupt"
        with im:
            return self._sample(im, h, w, rng)

    def _crop_box(self, iw: int, ih: int, h: int, w: int, rng: np.random.Generator):
        """Random crop of aspect w/h at a log-uniform scale: (x0, y0, x1, y1) in the photo's pixels, or None
        when the photo is too small for an (h, w) target without upsampling."""
        if min(iw, ih) < self.min_side:
            return None
        ratio = w / h
        ch_max = min(ih, iw / ratio)   # largest crop height with this aspect ratio
        ch_min = float(h)              # crop height at which the target is the crop at 1:1 (no upsampling)
        if ch_max < ch_min:
            return None
        ch = math.exp(rng.uniform(math.log(ch_min), math.log(ch_max)))  # scale: log-uniform
        ch = min(max(ch, ch_min), ch_max)  # exp(log(x)) can round past either end
        cw = min(ch * ratio, iw)
        x0, y0 = rng.uniform(0, iw - cw), rng.uniform(0, ih - ch)          # both >= 0 after the clamps
        return x0, y0, x0 + cw, y0 + ch

    def _finish(self, target: Image.Image, inp: Image.Image, converted: bool, rng: np.random.Generator):
        if rng.random() < 0.5:                                             # horizontal flip, both alike
            target, inp = (im.transpose(Image.FLIP_LEFT_RIGHT) for im in (target, inp))
        return _to_tensor(inp), _to_tensor(target), converted

    def _sample_cached(self, entry: CachedPhoto, h: int, w: int, rng: np.random.Generator):
        """The recipe of _sample, read from the decoded pyramid (photo_cache.py) instead of the JPEG."""
        box = self._crop_box(*entry.size, h, w, rng)
        if box is None:
            return "small"
        S = self.input_size
        target = entry.crop(box, (w, h))
        inp = target if (h, w) == (S, S) else entry.crop(box, (S, S))
        return self._finish(target, inp, entry.converted, rng)

    def _sample(self, im: Image.Image, h: int, w: int, rng: np.random.Generator):
        """Random crop of aspect w/h, random scale and flip -> (input, target) tensors, or 'small' / 'corrupt'."""
        iw, ih = _oriented_size(im)
        box = self._crop_box(iw, ih, h, w, rng)
        if box is None:
            return "small"
        cw, ch = box[2] - box[0], box[3] - box[1]
        try:
            # JPEG: decode at 1/2, 1/4 or 1/8 when that still leaves the crop >= both outputs (fast, and
            # still downsampling only). exif_transpose below needs the oriented size, so skip for rotated.
            need = max(h / ch, w / cw, self.input_size / ch, self.input_size / cw) * 1.02
            orientation = im.getexif().get(0x0112, 1) if im.format == "JPEG" else 1
            if im.format == "JPEG" and need < 0.5 and orientation == 1:
                im.draft(im.mode, (math.ceil(iw * need), math.ceil(ih * need)))
            converted = im.mode != "RGB"
            im = to_rgb(im)  # loads the pixels: corrupt / truncated files raise here
        except Exception:
            return "corrupt"
        sx, sy = im.width / iw, im.height / ih
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        assert box[3] - box[1] >= h - 0.5 and box[2] - box[0] >= w - 0.5, "crop smaller than target"
        target = im.resize((w, h), Image.LANCZOS, box=box, reducing_gap=3.0)
        S = self.input_size
        inp = target if (h, w) == (S, S) else im.resize((S, S), Image.LANCZOS, box=box, reducing_gap=3.0)
        return self._finish(target, inp, converted, rng)

    # -- batches -------------------------------------------------------------------------------------------
    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, *key])

    def _file_at(self, position: int) -> Path:
        """Position in this rank's infinite stream: an epoch-wise permutation of its files."""
        n = len(self.files)
        epoch, i = divmod(position, n)
        return self.files[self._rng(1, epoch).permutation(n)[i]]

    def _iter_files(self, worker: int, num_workers: int, stats: DataStats) -> Iterator[dict]:
        bad: set[Path] = set()
        b = self.start + worker
        while True:  # batch b = batch_size stream positions, plus random replacements for skipped photos
            rng = self._rng(0, b)
            h, w = batch_size_hw(rng, self.out_min, self.out_max, self.aspect_ratios, self.multiple)
            inputs, targets, keys = [], [], []
            tries = 0
            for j in range(self.batch_size):
                path = self._file_at(b * self.batch_size + j)
                while True:
                    result = "corrupt"
                    if path not in bad:
                        result = self._load(path, h, w, rng)
                    if isinstance(result, tuple):
                        break
                    if path not in bad:
                        if result == "corrupt":
                            bad.add(path)
                            stats.skipped_corrupt += 1
                        else:
                            stats.skipped_small += 1
                    tries += 1
                    if len(bad) == len(self.files) or tries > 20 * self.batch_size + 10 * len(self.files):
                        raise ValueError(f"no usable image in {self.source} for a {h}x{w} target "
                                         f"({len(bad)} of {len(self.files)} files unreadable; "
                                         f"{stats.skipped_small} skipped as too small)")
                    path = self.files[rng.integers(len(self.files))]
                inp, tgt, converted = result
                inputs.append(inp), targets.append(tgt), keys.append(str(path))
                stats.loaded += 1
                stats.converted += int(converted)
            stats.batches += 1
            yield {"input": torch.stack(inputs), "target": torch.stack(targets), "key": keys}
            b += num_workers

    def _iter_shards(self, worker: int, num_workers: int, stats: DataStats) -> Iterator[dict]:
        import webdataset as wds

        def handler(exn: Exception) -> bool:  # a corrupt tar member / shard: count it, go on
            stats.skipped_corrupt += 1
            return True

        # shards split over ranks, then workers; with fewer shards than readers, samples are split instead
        readers, reader = self.world_size * num_workers, self.rank * num_workers + worker
        by_shard = len(self.shards) >= readers
        shards = self.shards[reader::readers] if by_shard else self.shards
        rng = np.random.default_rng([self.seed, self.rank, worker, self.start])

        def stream() -> Iterator[tuple[str, bytes]]:
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
                        stats.skipped_corrupt += 1
                        continue
                    found += 1
                    yield sample["__key__"], data
                if not found:
                    raise ValueError(f"no readable image in the shards {self.source}")

        pool: list[tuple[str, bytes]] = []  # shuffle buffer; also where too-small samples wait for a later batch
        samples = stream()
        misses = 0
        while True:
            h, w = batch_size_hw(rng, self.out_min, self.out_max, self.aspect_ratios, self.multiple)
            inputs, targets, keys = [], [], []
            while len(inputs) < self.batch_size:
                while len(pool) < 4 * self.batch_size:
                    pool.append(next(samples))
                key, data = pool.pop(int(rng.integers(len(pool))))
                result = self._load(data, h, w, rng)
                if not isinstance(result, tuple):
                    stats.skipped_corrupt += result == "corrupt"
                    stats.skipped_small += result == "small"
                    misses += 1
                    if misses > 50 * self.batch_size:
                        raise ValueError(f"no usable image in {self.source} for a {h}x{w} target "
                                         f"after {misses} tries (corrupt or too small)")
                    continue
                misses = 0
                inp, tgt, converted = result
                inputs.append(inp), targets.append(tgt), keys.append(key)
                stats.loaded += 1
                stats.converted += int(converted)
            stats.batches += 1
            yield {"input": torch.stack(inputs), "target": torch.stack(targets), "key": keys}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        stats = DataStats()  # per worker; each batch carries a snapshot that Loader sums
        it = (self._iter_files if self.files is not None else self._iter_shards)(worker, num_workers, stats)
        for batch in it:
            batch["stats"] = (worker, asdict(stats))
            yield batch

    def probe(self) -> None:
        """Fail early, in the main process, when not one file of the source is readable."""
        if self.files is None:
            return
        if self.cached is not None:
            if any(e is not None for e in self.cached.values()):
                return
            raise ValueError(f"no readable image in {self.source} ({len(self.files)} files for rank {self.rank}, "
                             f"all corrupt, empty or not images)")
        for path in self.files:
            im = self._open(path)
            if im is None:
                continue
            try:
                im.draft("RGB", (64, 64))
                im.load()
                return
            except Exception:
                continue
        raise ValueError(f"no readable image in {self.source} ({len(self.files)} files for rank {self.rank}, "
                         f"all corrupt, empty or not images)")


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "WEBP", "PNG") else 1
    return (im.height, im.width) if orientation in (5, 6, 7, 8) else (im.width, im.height)


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


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the main process, which saves a checkpoint and then stops them.
    (Ctrl-C or `kill` of the process group would otherwise kill a worker mid-step and crash the trainer.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Loader:
    """Iterable over batches (infinite); `.stats` sums every worker's counters as batches arrive."""

    def __init__(self, dataset: MultiResDataset, num_workers: int):
        self.dataset = dataset
        # Its own generator: DataLoader draws a base seed for its workers each time iteration starts, from
        # torch's global generator otherwise, and that draw would shift the training run's random stream by
        # where the loader was (re)built (a resume, a checkpoint). The batches themselves use numpy
        # generators keyed by (seed, rank, batch), so this seed only reaches torch's per-worker seeding.
        generator = torch.Generator().manual_seed(dataset.seed * 1_000_003 + dataset.rank * 7919 + dataset.start)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                                  persistent_workers=num_workers > 0, generator=generator,
                                                  worker_init_fn=_ignore_stop_signals if num_workers else None)
        self._per_worker: dict[int, dict] = {}

    @property
    def stats(self) -> DataStats:
        total = DataStats()
        for counts in self._per_worker.values():
            total.add(DataStats(**counts))
        return total

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            worker, counts = batch.pop("stats")
            self._per_worker[worker] = counts
            yield batch


def make_loader(source, *, input_size: int, out_min: int, out_max: int, aspect_ratios: list[float],
                batch_size: int, num_workers: int, seed: int, rank: int = 0, world_size: int = 1,
                min_side: int | None = None, root: str | Path | None = None, start: int = 0,
                multiple: int = 8, cache: str | Path | None = None) -> Loader:
    """Infinite multi-resolution batches from a folder, a .txt split list (names relative to `root`, default
    the list's folder), a list of image files, or webdataset shard urls ("shards/train-{000000..000009}.tar").
    `start`: index of the first batch (exact resume for folders / lists). `multiple`: H and W are multiples
    of it. `cache`: a folder of decoded photo pyramids (photo_cache.py; built on first use) to read instead
    of decoding the files at every sample (folders and split lists; shards are a stream and ignore it).
    Raises ValueError when the source has no readable image."""
    dataset = MultiResDataset(source, input_size=input_size, out_min=out_min, out_max=out_max,
                              aspect_ratios=aspect_ratios, batch_size=batch_size, seed=seed, rank=rank,
                              world_size=world_size, min_side=min_side, root=root, start=start, multiple=multiple,
                              cache=cache)
    dataset.probe()
    return Loader(dataset, num_workers)


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

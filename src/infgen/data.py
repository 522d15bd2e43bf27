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

Parts: crops.py (the crop recipe: sizes and boxes from a random generator), data_sources.py (discovery,
shards, decoding a photo into a sample); here, which photo and which generator serve each sample.

Speed: `cache=DIR` reads decoded photo pyramids (photo_cache.py, built once) instead of decoding a 2-6K-pixel
JPEG per sample; the crop recipe is the same, the pixels differ only by the pyramid's resampling.
"""
from __future__ import annotations

import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .crops import CropRecipe, Skip, batch_size_hw
from .data_sources import PhotoReader, Sample, list_images, read_split, resolve_source, shard_stream, write_shards
from .images import to_rgb
from .photo_cache import build_cache

# What other modules import from here: the loader, and (re-exported) what train / evaluate / photos use.
__all__ = ["DataStats", "Loader", "MultiResDataset", "make_loader", "batch_size_hw", "list_images", "read_split",
           "resolve_source", "to_rgb", "write_shards"]


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

    def count(self, skip: Skip) -> None:
        if skip is Skip.CORRUPT:
            self.skipped_corrupt += 1
        else:
            self.skipped_small += 1


class MultiResDataset(torch.utils.data.IterableDataset):
    """Infinite stream of batches (dicts); use with DataLoader(batch_size=None), see make_loader. Which photo
    and which random generator serve each sample is decided here (two strategies: positions in an epoch-wise
    permutation of files, or a shuffle pool over a stream of shards); the crop is crops.CropRecipe's, the
    pixels data_sources.PhotoReader's."""

    def __init__(self, source, *, input_size: int, out_min: int, out_max: int, aspect_ratios: Sequence[float],
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1, min_side: int | None = None,
                 root: str | Path | None = None, start: int = 0, multiple: int = 8,
                 cache: str | Path | None = None):
        self.recipe = CropRecipe(input_size, out_min, out_max, aspect_ratios, multiple, min_side or 0)
        for name, v in dict(batch_size=batch_size, world_size=world_size).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.start = start
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
        cached = None  # photo_cache entries by file
        if cache is not None and self.files is not None:
            cached = build_cache(self.files, cache, progress=rank == 0)
        self.reader = PhotoReader(self.recipe, cached)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, *key])

    def _file_at(self, position: int) -> Path:
        """Position in this rank's infinite stream: an epoch-wise permutation of its files."""
        n = len(self.files)
        epoch, i = divmod(position, n)
        return self.files[self._rng(1, epoch).permutation(n)[i]]

    @staticmethod
    def _batch(samples: list[Sample], keys: list[str], stats: DataStats) -> dict:
        stats.loaded += len(samples)
        stats.converted += sum(int(s.converted) for s in samples)
        stats.batches += 1
        return {"input": torch.stack([s.input for s in samples]), "target": torch.stack([s.target for s in samples]),
                "key": keys}

    def _iter_files(self, worker: int, num_workers: int, stats: DataStats) -> Iterator[dict]:
        """Batch b draws its size and every crop from the generator (seed, rank, 0, b): exact resume at any b,
        and the same batches whatever num_workers is."""
        bad: set[Path] = set()
        b = self.start + worker
        while True:  # batch b = batch_size stream positions, plus random replacements for skipped photos
            rng = self._rng(0, b)
            h, w = self.recipe.batch_hw(rng)
            samples, keys = [], []
            tries = 0
            for j in range(self.batch_size):
                path = self._file_at(b * self.batch_size + j)
                while True:
                    result = Skip.CORRUPT if path in bad else self.reader.load(path, h, w, rng)
                    if isinstance(result, Sample):
                        break
                    if path not in bad:  # a known corrupt file is not counted again
                        if result is Skip.CORRUPT:
                            bad.add(path)
                        stats.count(result)
                    tries += 1
                    if len(bad) == len(self.files) or tries > 20 * self.batch_size + 10 * len(self.files):
                        raise ValueError(f"no usable image in {self.source} for a {h}x{w} target "
                                         f"({len(bad)} of {len(self.files)} files unreadable; "
                                         f"{stats.skipped_small} skipped as too small)")
                    path = self.files[rng.integers(len(self.files))]
                samples.append(result), keys.append(str(path))
            yield self._batch(samples, keys, stats)
            b += num_workers

    def _iter_shards(self, worker: int, num_workers: int, stats: DataStats) -> Iterator[dict]:
        """One generator per (seed, rank, worker, start) for the shard order, the sizes and the crops."""
        # shards split over ranks, then workers; with fewer shards than readers, samples are split instead
        readers, reader = self.world_size * num_workers, self.rank * num_workers + worker
        by_shard = len(self.shards) >= readers
        shards = self.shards[reader::readers] if by_shard else self.shards
        rng = np.random.default_rng([self.seed, self.rank, worker, self.start])
        stream = shard_stream(shards, rng, reader, readers, by_shard, lambda: stats.count(Skip.CORRUPT), self.source)
        pool: list[tuple[str, bytes]] = []  # shuffle buffer; also where too-small samples wait for a later batch
        misses = 0
        while True:
            h, w = self.recipe.batch_hw(rng)
            samples, keys = [], []
            while len(samples) < self.batch_size:
                while len(pool) < 4 * self.batch_size:
                    pool.append(next(stream))
                key, data = pool.pop(int(rng.integers(len(pool))))
                result = self.reader.load(data, h, w, rng)
                if isinstance(result, Skip):
                    stats.count(result)
                    misses += 1
                    if misses > 50 * self.batch_size:
                        raise ValueError(f"no usable image in {self.source} for a {h}x{w} target "
                                         f"after {misses} tries (corrupt or too small)")
                    continue
                misses = 0
                samples.append(result), keys.append(key)
            yield self._batch(samples, keys, stats)

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
        if self.files is None or self.reader.any_readable(self.files):
            return
        raise ValueError(f"no readable image in {self.source} ({len(self.files)} files for rank {self.rank}, "
                         f"all corrupt, empty or not images)")


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


"""Training data: batch shapes, never-upsampling, bad files, webdataset shards, rank sharding, resume."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from infgen.cli import main
from infgen.crops import Crop, CropRecipe, Skip
from infgen.data import batch_size_hw, list_images, make_loader, read_split

KW = dict(input_size=32, out_min=32, out_max=64, aspect_ratios=[0.5, 1.0, 2.0], batch_size=3, num_workers=0,
          seed=0)


def noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB").convert(mode)


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        noise(160 + 16 * i, 144, seed=i).save(root / ("sub" if i % 2 else ".") / f"p{i}.jpg", quality=90)
    noise(150, 170, seed=9).save(root / "q.PNG")
    (root / "notes.txt").write_text("not an image")
    return root


def take(loader, n):
    return [b for _, b in zip(range(n), loader)]


def test_list_images_and_split(photos, tmp_path):
    files = list_images(photos)
    assert [p.name for p in files] == ["p0.jpg", "p2.jpg", "p4.jpg", "q.PNG", "p1.jpg", "p3.jpg", "p5.jpg"]
    split = tmp_path / "train.txt"
    split.write_text("# comment\np0.jpg\n\nsub/p1.jpg\n")
    assert read_split(split, photos) == [photos / "p0.jpg", photos / "sub" / "p1.jpg"]
    batch = take(make_loader(split, root=photos, **KW), 1)[0]
    assert set(batch["key"]) <= {str(photos / "p0.jpg"), str(photos / "sub" / "p1.jpg")}


def test_batch_shapes_and_ranges(photos):
    loader = make_loader(photos, **KW)
    sizes = set()
    for batch in take(loader, 8):
        b, c, h, w = batch["target"].shape
        assert (b, c) == (3, 3) and h % 8 == 0 and w % 8 == 0
        assert 32 * 32 / 1.5 <= h * w <= 64 * 64 * 1.5, (h, w)  # area in range up to rounding to 8
        assert batch["input"].shape == (3, 3, 32, 32)
        for t in (batch["input"], batch["target"]):
            assert t.dtype == torch.float32 and t.min() >= -1 and t.max() <= 1 and t.max() - t.min() > 1
        assert len(batch["key"]) == 3
        sizes.add((h, w))
    assert len(sizes) > 2  # the size changes from batch to batch
    assert loader.stats.batches == 8 and loader.stats.loaded == 24


def test_never_upsamples(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    noise(40, 40, seed=1).save(root / "small.png")
    noise(300, 300, seed=2).save(root / "big.png")
    loader = make_loader(root, **{**KW, "out_min": 64, "out_max": 96, "aspect_ratios": [1.0]})
    for batch in take(loader, 4):
        assert all(k.endswith("big.png") for k in batch["key"])
    assert loader.stats.skipped_small > 0
    # a photo exactly the target size can only be the full photo at 1:1: the target IS the photo
    exact = tmp_path / "exact"
    exact.mkdir()
    noise(64, 64, seed=3).save(exact / "a.png")
    batch = take(make_loader(exact, **{**KW, "out_min": 64, "out_max": 64, "aspect_ratios": [1.0]}), 1)[0]
    want = torch.from_numpy(np.array(noise(64, 64, seed=3))).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(batch["target"][0], want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no usable image"):  # nothing is large enough
        take(make_loader(exact, **{**KW, "out_min": 96, "out_max": 96}), 1)


# Sides where exp(log(side)) > side in this platform's floating point (88 and 136 with glibc).
_ROUNDS_UP = [s for s in range(8, 4097, 8) if math.exp(math.log(s)) > s][:2]


@pytest.mark.skipif(not _ROUNDS_UP, reason="exp(log(x)) never rounds up here")
@pytest.mark.parametrize("side", _ROUNDS_UP)
@pytest.mark.parametrize("aspect", [1.0, 16 / 9])
def test_exact_size_photo_survives_log_rounding(tmp_path, side, aspect):
    """The crop scale is exp(uniform(log lo, log hi)); it rounded past hi when lo == hi, which made the
    crop larger than the photo and crashed a GPU training run at step ~1480 (numpy: high - low < 0)."""
    h, w = batch_size_hw(np.random.default_rng(0), side, side, [aspect], 8)  # the batch's (only) target size
    noise(w, h, seed=4).save(tmp_path / "a.png")
    batch = take(make_loader(tmp_path, **{**KW, "out_min": side, "out_max": side, "aspect_ratios": [aspect]}), 2)[1]
    want = torch.from_numpy(np.array(noise(w, h, seed=4))).permute(2, 0, 1).float() / 127.5 - 1
    assert batch["target"].shape == (3, 3, h, w)
    got = batch["target"][0]                                  # the whole photo at 1:1, possibly mirrored
    torch.testing.assert_close(got if torch.equal(got, want) else got.flip(-1), want, atol=1e-6, rtol=0)


def test_bad_files_are_converted_or_skipped_and_counted(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    good = noise(120, 100, seed=4)
    good.save(root / "rgb.jpg")
    good.convert("L").save(root / "grey.jpg")
    good.convert("CMYK").save(root / "cmyk.jpg")
    good.convert("P").save(root / "palette.png")
    alpha = good.convert("RGBA")
    alpha.putalpha(128)
    alpha.save(root / "alpha.png")
    Image.fromarray(np.asarray(good.convert("L"), dtype=np.uint16) * 257).save(root / "deep16.png")
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("hello, not a jpeg")
    (root / "garbage.webp").write_bytes(np.random.default_rng(0).bytes(5000))
    good.save(root / "full.jpg")
    (root / "truncated.jpg").write_bytes((root / "full.jpg").read_bytes()[:600])
    (root / "full.jpg").unlink()
    loader = make_loader(root, **{**KW, "batch_size": 4, "aspect_ratios": [1.0], "out_max": 48})
    batches = take(loader, 12)
    seen = {k.rsplit("/", 1)[1] for b in batches for k in b["key"]}
    assert seen == {"rgb.jpg", "grey.jpg", "cmyk.jpg", "palette.png", "alpha.png", "deep16.png"}
    stats = loader.stats
    assert stats.skipped_corrupt == 4  # empty, text, garbage, truncated: once each
    assert stats.converted > 0 and stats.loaded == 48
    for b in batches:
        assert b["target"].shape[:2] == (4, 3) and b["target"].abs().max() <= 1


def test_no_usable_image_names_the_path(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "b.png").write_text("nope")
    with pytest.raises(ValueError, match="junk"):
        make_loader(root, **KW)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        make_loader(tmp_path / "empty", **KW)


def test_webdataset_shards_round_trip(photos, tmp_path, capsys):
    pattern = str(tmp_path / "shards" / "train-%06d.tar")
    assert main(["data", "shards", str(photos), pattern, "--per-shard", "3"]) == 0
    shards = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]  # 7 images, 3 per shard
    loader = make_loader(str(tmp_path / "shards" / "train-{000000..000002}.tar"), **KW)
    keys = set()
    for batch in take(loader, 6):
        assert batch["input"].shape == (3, 3, 32, 32) and batch["target"].shape[:2] == (3, 3)
        keys |= set(batch["key"])
    assert keys == {"00000000_p0", "00000001_p2", "00000002_p4", "00000003_q", "00000004_sub_p1",
                    "00000005_sub_p3", "00000006_sub_p5"}
    assert loader.stats.skipped_corrupt == 0


def test_ranks_see_different_photos(photos):
    keys = []
    for rank in (0, 1):
        loader = make_loader(photos, **KW, rank=rank, world_size=2)
        keys.append({k for b in take(loader, 4) for k in b["key"]})
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_deterministic_resume_and_workers(photos):
    full = take(make_loader(photos, **KW), 5)
    again = take(make_loader(photos, **KW), 5)
    resumed = take(make_loader(photos, **KW, start=2), 3)
    workers = take(make_loader(photos, **{**KW, "num_workers": 2}), 5)
    other_seed = take(make_loader(photos, **{**KW, "seed": 1}), 5)
    for a, b, c in zip(full, again, workers):
        torch.testing.assert_close(a["target"], b["target"])
        torch.testing.assert_close(a["target"], c["target"])
        assert a["key"] == c["key"]
    for a, b in zip(full[2:], resumed):
        torch.testing.assert_close(a["target"], b["target"])
        torch.testing.assert_close(a["input"], b["input"])
    assert any(a["target"].shape != b["target"].shape or not torch.equal(a["target"], b["target"])
               for a, b in zip(full, other_seed))


# -- the crop recipe (crops.py): geometry only, no files ---------------------------------------------------

RECIPE = CropRecipe(input_size=64, out_min=64, out_max=256, aspect_ratios=[0.5, 1.0, 2.0])


def test_crop_recipe_gives_exact_boxes_for_a_seed():
    """Pinned: a change here changes every training run's crops (and breaks exact resume of old runs)."""
    rng = np.random.default_rng(0)
    assert RECIPE.batch_hw(rng) == (64, 128)
    first, second = RECIPE.crop(400, 300, 96, 128, rng), RECIPE.crop(400, 300, 96, 128, rng)
    for crop, box in ((first, (4.394407678217883, 162.17569252898292, 138.5119908840855, 262.76387993338363)),
                      (second, (22.961873676586286, 20.709223577732963, 385.11070400637084, 292.32084632507144))):
        assert isinstance(crop, Crop) and crop.target == (128, 96) and crop.input == (64, 64)
        assert crop.box == pytest.approx(box, abs=1e-9)


def test_crop_recipe_draws_a_fixed_number_of_randoms():
    """Exact resume depends on it: a size is 2 draws, a crop 3, a flip 1; a too-small photo none."""
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    RECIPE.batch_hw(rng), ref.random(2)
    RECIPE.crop(1000, 800, 200, 100, rng), ref.random(3)
    assert RECIPE.crop(50, 50, 200, 100, rng) is Skip.SMALL
    RECIPE.flip(rng), ref.random(1)
    assert rng.random() == ref.random()


def test_crop_recipe_keeps_aspect_ratio_and_bounds():
    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w = RECIPE.batch_hw(rng)
        assert h % 8 == 0 and w % 8 == 0 and (64 * 64) / 1.3 <= h * w <= (256 * 256) * 1.3, (h, w)
        assert any(abs(w - h * a) <= 4 + 4 * a for a in RECIPE.aspect_ratios), (h, w)  # a bucket, +- rounding
        iw, ih = (int(v) for v in rng.integers(h // 2, 4 * max(h, w), 2))
        crop = RECIPE.crop(iw, ih, h, w, rng)
        if crop is Skip.SMALL:  # only when no crop of aspect w/h holds h x w pixels
            assert ih < h or iw < w
            continue
        x0, y0, x1, y1 = crop.box
        assert 0 <= x0 and 0 <= y0 and x1 <= iw + 1e-9 and y1 <= ih + 1e-9     # inside the photo
        assert x1 - x0 >= w - 1e-6 and y1 - y0 >= h - 1e-6                       # never upsampled
        assert (x1 - x0) / (y1 - y0) == pytest.approx(w / h, rel=1e-9)         # the batch's aspect ratio


def test_crop_recipe_reports_small_photos_and_bad_settings():
    rng = np.random.default_rng(0)
    assert RECIPE.crop(127, 400, 96, 128, rng) is Skip.SMALL            # narrower than the target
    assert RECIPE.crop(128, 96, 96, 128, rng).box == (0.0, 0.0, 128.0, 96.0)   # exactly the target: 1:1
    fussy = CropRecipe(input_size=64, out_min=64, out_max=64, aspect_ratios=[1.0], min_side=500)
    assert fussy.crop(499, 2000, 64, 64, rng) is Skip.SMALL             # below min_side, however large
    assert isinstance(fussy.crop(500, 2000, 64, 64, rng), Crop)
    for bad, message in ((dict(out_min=300), "out_min"), (dict(aspect_ratios=[]), "aspect_ratios"),
                         (dict(aspect_ratios=[1.0, -2.0]), "aspect_ratios"), (dict(input_size=0), "input_size")):
        with pytest.raises(ValueError, match=message):
            CropRecipe(**{"input_size": 64, "out_min": 64, "out_max": 256, "aspect_ratios": [1.0], **bad})


# -- the photo cache (photo_cache.py) --------------------------------------------------------------------

def test_cached_batches_equal_decoded_ones_at_full_resolution(tmp_path):
    """Crops no more than ~1.5x their outputs are read from the pyramid's level 0 and resized as the
    uncached path resizes the decoded photo: the same batches (PNG: no JPEG draft), up to one 8-bit level
    where the box offset's float rounding flips a rounding."""
    root = tmp_path / "png"
    root.mkdir()
    for i in range(3):
        noise(100 + 8 * i, 96, seed=i).save(root / f"p{i}.png")
    kw = {**KW, "out_min": 64, "out_max": 96, "input_size": 64, "aspect_ratios": [1.0, 0.75]}
    plain = take(make_loader(root, **kw), 4)
    cached = take(make_loader(root, cache=tmp_path / "cache", **kw), 4)
    level = 2 / 255 + 1e-6                                 # one 8-bit level in [-1, 1]
    for a, b in zip(plain, cached):
        assert a["key"] == b["key"]
        for name in ("target", "input"):
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=level)
            assert (b[name] != a[name]).float().mean() < 1e-3


def test_cache_reads_smaller_levels_for_large_crops(tmp_path):
    """A 1600 x 1200 photo and 32-64 px outputs: the crop comes from a 1/8..1/32 level, and the pixels agree
    with the full decode + Lanczos (a smooth photo: the pyramid's box filter aliases nothing here)."""
    from infgen.photo_cache import build_cache
    yy, xx = np.mgrid[0:1200, 0:1600] / 1600.0
    a = np.stack([np.sin(6 * xx + 2 * yy), np.cos(5 * yy - 3 * xx), np.sin(4 * (xx + yy))], -1)
    Image.fromarray(((a * 0.5 + 0.5) * 255).round().astype(np.uint8)).save(tmp_path / "big.png")
    entry = build_cache([tmp_path / "big.png"], tmp_path / "cache")[tmp_path / "big.png"]
    assert entry.size == (1600, 1200) and entry.level_sizes[:3] == [(1600, 1200), (800, 600), (400, 300)]
    reads = []
    entry.level = (lambda k, level=entry.level: reads.append(k) or level(k))
    got = np.asarray(entry.crop((100.0, 50.0, 1300.0, 1100.0), (48, 42)), dtype=np.float64)
    want = np.asarray(Image.open(tmp_path / "big.png").resize((48, 42), Image.LANCZOS, box=(100, 50, 1300, 1100)),
                      dtype=np.float64)
    assert reads and min(reads) >= 4                       # 1200 px -> 48 px: the 1/16 level (75 x 100 px)
    assert np.abs(got - want).mean() < 1.0                 # 8-bit levels


def test_cache_is_built_once_and_counts_bad_files(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    noise(120, 100, seed=1).save(root / "good.jpg")
    (root / "bad.jpg").write_text("not a jpeg")
    cache = tmp_path / "cache"
    loader = make_loader(root, cache=cache, **{**KW, "aspect_ratios": [1.0], "out_max": 48})
    batches = take(loader, 3)
    assert {k.rsplit("/", 1)[1] for b in batches for k in b["key"]} == {"good.jpg"}
    assert loader.stats.skipped_corrupt == 1
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 2                               # one per file, the bad one marked corrupt
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    take(make_loader(root, cache=cache, **KW), 1)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before   # reused, nothing rewritten


def test_data_cache_command(tmp_path, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    noise(120, 100, seed=1).save(root / "a.jpg")
    (root / "b.jpg").write_text("not a jpeg")
    (tmp_path / "list.txt").write_text("a.jpg\nb.jpg\n")
    assert main(["data", "cache", str(tmp_path / "list.txt"), "--root", str(root), "--cache", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "1 photos cached" in out and "b.jpg" in out
    assert len(list((tmp_path / "c").glob("*/level0.npy"))) == 1

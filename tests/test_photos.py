"""`infgen data photos`: the fixed split lists, a fake source tree, RGB output, clean errors, dedupe."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infgen import photos
from infgen.cli import main

SPLITS = Path(__file__).resolve().parents[1] / "data" / "splits"


def noise(w: int, h: int, seed: int) -> Image.Image:
    # smooth random field: a resized copy keeps its perceptual hash, unlike per-pixel noise
    a = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB").resize((w, h), Image.BICUBIC)


def test_committed_split_lists():
    train = photos.read_split_names(SPLITS / "train.txt")
    val = photos.read_split_names(SPLITS / "val.txt")
    assert len(val) >= 12 and len(train) >= 50
    assert not set(train) & set(val)
    sources = {n.split("-", 1)[0] for n in val}
    assert "interior" in sources and len(sources) >= 3  # interiors and wallpapers
    assert not (set(train) | set(val)) & (photos.NOT_PHOTOS | set(photos.NEAR_DUPLICATES))
    assert not set(val) & photos.SAME_SHOOT
    assert all(n.split("-", 1)[0] in photos.SOURCES and n.endswith((".jpg", ".png")) for n in train + val)
    # the lists are exactly what choose_split gives for their union: reproducible, not hand-edited
    assert photos.choose_split(train + val) == (sorted(train), sorted(val))


@pytest.fixture
def fake_sources(tmp_path):
    roots = {name: tmp_path / "src" / name for name in photos.SOURCES}
    for root in roots.values():
        root.mkdir(parents=True)
    noise(300, 200, 1).save(roots["lomiri"] / "Bridge_by_Someone.jpg")
    alpha = noise(200, 150, 2).convert("RGBA")
    alpha.putalpha(100)
    alpha.save(roots["lxqt"] / "Valendas.png")
    noise(320, 200, 3).convert("CMYK").save(roots["mate"] / "Dune.jpg")
    images = roots["plasma"] / "Grey" / "contents" / "images"
    images.mkdir(parents=True)
    noise(256, 160, 4).convert("L").save(images / "2560x1600.jpg")
    (images / "1280x800.jpg").symlink_to("2560x1600.jpg")  # Plasma: other sizes are links to one file
    noise(200, 300, 5).save(roots["interior"] / "pexels-1.jpg")
    noise(200, 300, 6).save(roots["interior"] / "pexels-2.jpg")
    args = [f"--source-root={name}={root}" for name, root in roots.items()]
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text("lomiri-Bridge_by_Someone.jpg\nlxqt-Valendas.png\nplasma-Grey.jpg\n"
                                      "interior-pexels-1.jpg\n")
    (splits / "val.txt").write_text("mate-Dune.jpg\ninterior-pexels-2.jpg\n")
    return roots, splits, args


def test_data_photos_writes_rgb(fake_sources, tmp_path, capsys):
    roots, splits, args = fake_sources
    assert sorted(photos.find_photos(roots)) == [
        "interior-pexels-1.jpg", "interior-pexels-2.jpg", "lomiri-Bridge_by_Someone.jpg", "lxqt-Valendas.png",
        "mate-Dune.jpg", "plasma-Grey.jpg"]  # one Plasma file despite the symlink
    out = tmp_path / "out"
    assert main(["data", "photos", "--out", str(out), "--splits", str(splits), *args]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted((splits / "train.txt").read_text().split() + (splits / "val.txt").read_text().split())
    for p in out.iterdir():
        with Image.open(p) as im:
            assert im.mode == "RGB", p.name
            assert im.format == ("PNG" if p.suffix == ".png" else "JPEG")
    assert (out / "lomiri-Bridge_by_Someone.jpg").read_bytes() == (roots["lomiri"] / "Bridge_by_Someone.jpg").read_bytes()
    with Image.open(out / "lxqt-Valendas.png") as im:  # alpha composited on white: lighter than the source
        assert np.asarray(im).mean() > np.asarray(noise(200, 150, 2)).mean() + 20
    assert "wrote 6 photos" in capsys.readouterr().out


def test_data_photos_missing_photo_is_a_clean_error(fake_sources, tmp_path, capsys):
    roots, splits, args = fake_sources
    (roots["interior"] / "pexels-2.jpg").unlink()
    assert main(["data", "photos", "--out", str(tmp_path / "out"), "--splits", str(splits), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "interior-pexels-2.jpg" in err and "--install" in err
    assert main(["data", "photos", "--splits", str(tmp_path / "nowhere"), *args]) == 2
    assert "split list" in capsys.readouterr().err


def test_write_splits_filters_and_dedupes(fake_sources, tmp_path):
    roots, splits, args = fake_sources
    noise(300, 200, 1).resize((150, 100)).save(roots["lomiri"] / "Bridge_small_copy.jpg")  # near duplicate
    (roots["lomiri"] / "Copy.jpg").write_bytes((roots["lomiri"] / "Bridge_by_Someone.jpg").read_bytes())
    noise(300, 200, 7).save(roots["lomiri"] / "Fossa_by_Jasper_Roks.jpg")  # listed in NOT_PHOTOS
    sizes = photos.collect(tmp_path / "out", splits, roots, write_splits=True, quiet=True)
    dropped = {"lomiri-Bridge_small_copy.jpg", "lomiri-Copy.jpg", "lomiri-Fossa_by_Jasper_Roks.jpg"}
    assert sorted(sizes) == sorted(photos.find_photos(roots).keys() - dropped)
    val = (splits / "val.txt").read_text().split()
    assert len(val) == 5  # ceil(15%) of each of the five sources: one each
    kept, dropped = photos.dedupe({"a.jpg": roots["lomiri"] / "Bridge_by_Someone.jpg",
                                   "b.jpg": roots["lomiri"] / "Bridge_small_copy.jpg",
                                   "c.jpg": roots["interior"] / "pexels-1.jpg"})
    assert list(kept) == ["a.jpg", "c.jpg"] and dropped == {"b.jpg": "a.jpg"}

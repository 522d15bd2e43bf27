"""Metrics known answers and the `infgen eval` protocol on a tiny bundle."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from infgen.cli import main
from infgen.evaluate import centre_crop
from infgen.metrics import fid_from_features, kid_from_features, lattice_differences, psnr, ssim


def test_psnr_known_answer():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.1                               # MSE 0.01 -> 20 dB
    torch.testing.assert_close(psnr(x, y), torch.tensor([20.0, 20.0]))
    assert psnr(x, x)[0] > 100


def test_ssim_known_answers():
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(ssim(x, x), torch.tensor([1.0]))
    assert ssim(x, 1 - x)[0] < 0              # anti-correlated structure
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert 0.3 < ssim(x, noisy)[0] < 0.99


def test_fid_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 4))
    assert abs(fid_from_features(a, a)) < 1e-6
    b = a + np.array([1.0, 2.0, 0.0, 0.0])    # shifted mean, same covariance: FID = |dmu|^2 = 5
    assert fid_from_features(a, b) == pytest.approx(5.0, abs=1e-6)


def test_kid_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    same = kid_from_features(a, rng.normal(size=(400, 16)))[0]
    shifted = kid_from_features(a, rng.normal(size=(400, 16)) + 1.0)[0]
    assert abs(same) < 0.05 and shifted > 0.5


def test_lattice_differences_known_answer():
    # a ramp of 0.01 per column plus a jump of 0.05 at every 16-px border; rows constant
    x = torch.arange(64, dtype=torch.float32) * 0.01 + (torch.arange(64) // 16) * 0.05
    img = x.expand(1, 3, 64, 64)
    cell, other = lattice_differences(img, (16, 16))[0]
    # borders at 16, 32, 48 on each axis: rows 0, columns 0.06; other token borders 8, 24, 40, 56: 0 and 0.01
    torch.testing.assert_close(cell, torch.tensor(0.03))
    torch.testing.assert_close(other, torch.tensor(0.005))
    with pytest.raises(ValueError, match="multiples of 8"):
        lattice_differences(img, (12, 16))


def test_centre_crop_box():
    im = Image.new("RGB", (400, 300))
    assert centre_crop(im, 1.0) == (50, 0, 350, 300)
    assert centre_crop(im, 16 / 9) == (0, 37, 400, 262)


@pytest.mark.slow
def test_eval_end_to_end_on_tiny_bundle(tiny_bundle, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1):
        Image.fromarray((rng.random((100, 140, 3)) * 255).astype("uint8")).save(root / f"p{i}.png")
    Image.new("RGB", (20, 20)).save(root / "small.png")  # too small for the 64 px targets: skipped, counted
    (tmp_path / "val.txt").write_text("p0.png\nsmall.png\n")
    out = tmp_path / "eval"
    rc = main(["eval", "--checkpoint", str(tiny_bundle), "--split", str(tmp_path / "val.txt"), "--root", str(root),
               "--input-size", "32", "--scales", "1,2", "--nonsquare", "96x48", "--patch", "16",
               "--patches-per-image", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert list(res) == ["1x", "2x", "96x48"]
    assert res["2x"]["size"] == [64, 64] and res["2x"]["n_images"] == 1 and res["2x"]["skipped_too_small"] == 1
    for entry in res.values():
        for m in ("infgen", "ae+bicubic", "ae+lanczos", "bicubic", "lanczos"):
            assert np.isfinite(entry[m]["psnr"]) and -1 <= entry[m]["ssim"] <= 1
            assert np.isfinite(entry[m]["kid"]) and np.isfinite(entry[m]["patch_fid"])
            assert entry[m]["n_patches"] == 2
    # at 1x the two resize baselines are the autoencoder's own decode: identical scores
    assert res["1x"]["ae+bicubic"]["psnr"] == res["1x"]["ae+lanczos"]["psnr"]
    # the lattice ratio exists at the 2x upscale only (16-px latent cells; 1x has none, 96x48 is fractional)
    assert all(np.isfinite(res["2x"][m]["lattice"]) for m in ("infgen", "bicubic"))
    assert res["1x"]["infgen"]["lattice"] is None and res["96x48"]["infgen"]["lattice"] is None
    md = (out / "results.md").read_text()
    assert "| 2x (64x64, n=1) | **InfGen** |" in md and "| 2x (64x64, n=1) | bicubic of the input |" in md
    assert "| 1x (32x32, n=1) | bicubic of the input |" not in md   # at 1x it is the ground truth itself
    assert len(list((out / "crops").glob("*.png"))) == 3


def test_eval_missing_photos_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "val.txt").write_text("nope.jpg\n")
    rc = main(["eval", "--split", str(tmp_path / "val.txt"), "--root", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "infgen data photos" in err and "Traceback" not in err

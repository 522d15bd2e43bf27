"""The `infgen eval` protocol: tiles, bootstrap summaries, the tables, and the whole command on a tiny bundle
(the metrics themselves: tests/test_metrics.py)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from infgen import evaluate
from infgen.cli import main
from infgen.evaluate import centre_crop, summarize, tile_positions, to_markdown
from infgen.metrics import bootstrap_counts, grams, interval, kid, kid_parts, lattice_differences, weighted_fid


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


def test_tile_positions_centred_grid():
    rng = np.random.default_rng(0)
    assert tile_positions(256, 256, 128, 16, rng) == (128, [(0, 0), (0, 128), (128, 0), (128, 128)])
    assert tile_positions(300, 300, 128, 16, rng) == (128, [(22, 22), (22, 150), (150, 22), (150, 150)])
    size, pos = tile_positions(576, 1024, 128, 16, rng)         # a 4 x 8 grid: 16 of its 32 tiles
    assert size == 128 and len(pos) == len(set(pos)) == 16 and pos == sorted(pos)
    assert all(y in (32, 160, 288, 416) and x % 128 == 0 and x + 128 <= 1024 for y, x in pos)
    assert tile_positions(40, 60, 128, 16, rng) == (40, [(0, 10)])   # smaller than a tile: one, the short side


def _synthetic_collect(n=12, tiles=3, d=16):
    """What `collect` returns, made up: InfGen 1 dB above AE + bicubic on every photo, equal to AE + Lanczos,
    3 dB below the input's resizes; its tile features near the ground truth's, AE + bicubic's far off."""
    rng = np.random.default_rng(0)
    base = rng.normal(28, 2, n)
    psnr = {"infgen": base + 1, "ae+bicubic": base + rng.normal(0, 0.05, n), "ae+lanczos": base + 1,
            "bicubic": base + 4, "lanczos": base + 4}
    photo = np.repeat(np.arange(n), tiles)
    real = rng.normal(size=(n, d))[photo] + 0.3 * rng.normal(size=(n * tiles, d))   # tiles resemble their photo
    shift = {"infgen": 0.1, "ae+bicubic": 1.0, "ae+lanczos": 0.1, "bicubic": 0.1, "lanczos": 0.1}
    feats = {"real": {"pool": real, "spatial": real[:, :8]}}
    how_hard = rng.exponential(1.0, n)[photo][:, None]              # some photos are harder than others
    for m, s in shift.items():
        f = real + rng.normal(0, 0.3, real.shape) + s * how_hard
        feats[m] = {"pool": f, "spatial": f[:, :8]}
    scores = {m: {"psnr": list(p), "ssim": [0.8] * n, "ms_ssim": [None] * n, "lattice": []} for m, p in psnr.items()}
    return {"methods": tuple(psnr), "n_images": n, "skipped_too_small": 1, "seconds": 1.0, "scores": scores,
            "features": feats, "patch_image": photo, "patch": 128}


def test_summarize_intervals_and_paired_verdicts():
    e = summarize(_synthetic_collect(), draws=300)
    assert e["n_images"] == 12 and e["n_patches"] == 36 and e["bootstrap_draws"] == 300
    for m in ("infgen", "ae+bicubic"):
        lo, hi = e[m]["psnr_ci"]
        assert lo < e[m]["psnr"] < hi and hi - lo < 3          # 12 photos, sd 2 dB: about +-1.1 dB
        assert e[m]["kid_ci"][0] < e[m]["kid"] < e[m]["kid_ci"][1]
    assert e["infgen"]["ms_ssim"] is None and e["infgen"]["lattice"] is None
    assert e["infgen"]["kid"] < e["ae+bicubic"]["kid"] and e["infgen"]["precision"] > e["ae+bicubic"]["precision"]
    # KID over pairs of different photos, its bootstrap over photos (tiles of a photo move together: a
    # bootstrap over tiles would claim a narrower interval)
    data = _synthetic_collect()
    real, fake, photo = data["features"]["real"]["pool"], data["features"]["ae+bicubic"]["pool"], data["patch_image"]
    parts = kid_parts(real, fake, photo)
    assert e["ae+bicubic"]["kid"] == pytest.approx(kid(parts)) != pytest.approx(kid(kid_parts(real, fake)))
    tiles_lo, tiles_hi = interval([kid(parts, w) for w in bootstrap_counts(len(photo), 300)])
    lo, hi = e["ae+bicubic"]["kid_ci"]
    assert hi - lo > 1.3 * (tiles_hi - tiles_lo)
    vs = e["infgen_vs"]
    # +1 dB on every photo: resolved although the photos' own spread (2 dB) is larger
    assert vs["ae+bicubic"]["psnr"]["verdict"] == "better"
    assert vs["ae+bicubic"]["psnr"]["diff"] == pytest.approx(1, abs=0.05)
    assert vs["ae+bicubic"]["kid"]["verdict"] == "better" and vs["ae+bicubic"]["patch_fid"]["verdict"] == "better"
    assert vs["ae+bicubic"]["psnr"]["infgen_better_fraction"] == 1.0
    assert vs["ae+lanczos"]["psnr"] == {"diff": 0.0, "ci": [0.0, 0.0], "infgen_better_fraction": 0.0,
                                        "verdict": "not resolved"}
    assert vs["bicubic"]["psnr"]["verdict"] == "worse"
    md = to_markdown({"2x": {"size": [512, 512], **e}}, {"n_photos": 13, "split": "val.txt", "input_size": 256,
                                                          "patch": 128, "patches_per_image": 3, "draws": 300,
                                                          "checkpoint": "x"})
    row = next(line for line in md.splitlines() if line.startswith("| 2x (512x512, n=12) | **InfGen** | "))
    assert row.count("[") == 2                                  # PSNR and KID with their intervals
    assert "| 2x (512x512, n=12) | AE + bicubic | +" not in md   # differences are signed by format, not text
    verdict = next(line for line in md.splitlines() if line.startswith("| 2x (512x512, n=12) | AE + bicubic | 1.0"))
    assert verdict.endswith("| PSNR better; KID better; pFID better |")
    assert "PSNR not resolved" in md and "PSNR worse" in md and "| sFID ↓ | precision ↑ | recall ↑ |" in md


@pytest.mark.slow
def test_eval_end_to_end_on_tiny_bundle(tiny_bundle, tmp_path, monkeypatch):
    # torchmetrics' FID eigendecomposes a d x d product (d = 2048: ~2 s a call, 26 calls here); on these few
    # tiles the N x N form computes the same number (tests/test_metrics.py holds them equal)
    monkeypatch.setattr(evaluate, "frechet_distance", lambda a, b: weighted_fid(grams(a, b), np.ones(len(a))))
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((100, 140, 3)) * 255).astype("uint8")).save(root / f"p{i}.png")
    Image.new("RGB", (20, 20)).save(root / "small.png")  # too small for the 64 px targets: skipped, counted
    (tmp_path / "val.txt").write_text("p0.png\np1.png\nsmall.png\n")
    out = tmp_path / "eval"
    rc = main(["eval", "--checkpoint", str(tiny_bundle), "--split", str(tmp_path / "val.txt"), "--root", str(root),
               "--input-size", "32", "--scales", "1,2", "--nonsquare", "96x48", "--patch", "16",
               "--patches-per-image", "1", "--bootstrap", "50", "--report", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert list(res) == ["1x", "2x", "96x48"]
    assert res["2x"]["size"] == [64, 64] and res["2x"]["n_images"] == 2 and res["2x"]["skipped_too_small"] == 1
    assert res["2x"]["n_patches"] == 2 and res["2x"]["bootstrap_draws"] == 50
    for name, entry in res.items():
        methods = ("infgen", "ae+bicubic", "ae+lanczos") + (("bicubic", "lanczos") if name != "1x" else ())
        assert [m for m in ("infgen", "ae+bicubic", "ae+lanczos", "bicubic", "lanczos") if m in entry] == list(methods)
        for m in methods:
            r = entry[m]
            assert np.isfinite(r["psnr"]) and r["psnr_ci"][0] <= r["psnr"] <= r["psnr_ci"][1]
            assert -1 <= r["ssim"] <= 1 and r["ms_ssim"] is None          # 32-96 px: too small for MS-SSIM
            assert all(np.isfinite(r[k]) for k in ("kid", "patch_fid", "sfid")) and len(r["kid_ci"]) == 2
            assert r["precision"] is None                                  # 2 tiles: too few for 3-NN balls
        assert set(entry["infgen_vs"]) == set(methods[1:])
    # at 1x the two resize baselines are the autoencoder's own decode: identical scores
    assert res["1x"]["ae+bicubic"]["psnr"] == res["1x"]["ae+lanczos"]["psnr"]
    # the lattice ratio exists at the 2x upscale only (16-px latent cells; 1x has none, 96x48 is fractional)
    assert all(np.isfinite(res["2x"][m]["lattice"]) for m in ("infgen", "bicubic"))
    assert res["1x"]["infgen"]["lattice"] is None and res["96x48"]["infgen"]["lattice"] is None
    md = (out / "results.md").read_text()
    assert "| 2x (64x64, n=2) | **InfGen** |" in md and "| 2x (64x64, n=2) | bicubic of the input |" in md
    assert "| 1x (32x32, n=2) | bicubic of the input |" not in md   # at 1x it is the ground truth itself
    assert len(list((out / "crops").glob("*.png"))) == 6
    report = (out / "report.md").read_text()
    assert "](scale_curves.png)" in report and "](crops/2x_p0.png)" in report
    assert Image.open(out / "scale_curves.png").size[0] > 600


def test_eval_missing_photos_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "val.txt").write_text("nope.jpg\n")
    rc = main(["eval", "--split", str(tmp_path / "val.txt"), "--root", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "infgen data photos" in err and "Traceback" not in err

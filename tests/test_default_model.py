"""The bundled default model: it loads with no argument, and at 2x it beats the obvious baseline.

A regression in the model, the decode path or the shipped weights turns this red: on validation crops
(never used in training), InfGen's 2x decode of a 256^2 photo's latent must have a higher mean PSNR against
the 512^2 ground truth than the autoencoder's own decode + bicubic upsampling of the same latent.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from infgen.metrics import psnr
from infgen.pipeline import DEFAULT_BUNDLE, InfGenPipeline, pil_to_tensor

CROPS = sorted((Path(__file__).parent / "data" / "val_crops").glob("*.jpg"))


def test_bundle_is_shipped_and_loads_by_default():
    assert (DEFAULT_BUNDLE / "infgen" / "model.safetensors").is_file()
    assert (DEFAULT_BUNDLE / "codec" / "model.safetensors").is_file()
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE.rglob("*") if p.is_file())
    assert size < 50e6
    pipe = InfGenPipeline.from_pretrained()
    assert pipe.codec is not None and pipe.info.train_latent == 32
    assert pipe.model.config.scaling_factor == pipe.codec.scaling_factor


def _psnr_at_2x() -> tuple[float, float]:
    """Mean PSNR (dB) at 2x on the validation crops: (InfGen, autoencoder decode + bicubic)."""
    assert len(CROPS) == 6
    pipe = InfGenPipeline.from_pretrained()
    ours, bicubic = [], []
    for path in CROPS:
        im = Image.open(path).convert("RGB")
        gt = pil_to_tensor(im) * 0.5 + 0.5                                  # (1, 3, 512, 512) in [0, 1]
        z = pipe.encode(pil_to_tensor(im.resize((256, 256), Image.LANCZOS)))
        assert z.shape == (1, 4, 32, 32)
        out = pipe.decode(z, 512, 512).float() * 0.5 + 0.5
        base = F.interpolate(pipe.codec.decode(z), size=(512, 512), mode="bicubic", align_corners=False)
        ours.append(psnr(out, gt))
        bicubic.append(psnr(base.clamp(-1, 1) * 0.5 + 0.5, gt))
    return torch.cat(ours).mean().item(), torch.cat(bicubic).mean().item()


# The target of issue 4 on these crops: the shipped weights give InfGen 23.83 dB vs autoencoder + bicubic
# 23.79 dB (stage 4 of `make train-default`; before it, 21.93 dB). See docs/eval/results.md for the whole split.
def test_bundled_model_beats_autoencoder_plus_bicubic_at_2x():
    ours, bicubic = _psnr_at_2x()
    assert bicubic == pytest.approx(23.79, abs=0.02)  # the baseline itself (codec weights + protocol) unchanged
    assert ours > bicubic, f"InfGen 2x PSNR {ours:.2f} dB <= autoencoder + bicubic {bicubic:.2f} dB"
    assert ours >= 23.80, f"InfGen 2x PSNR {ours:.2f} dB fell below the shipped model's 23.83 dB"

"""The bundled default model: it loads with no argument, beats the paper's baseline at 2x, draws no latent-cell
grid, and its automatic bf16 gives the fp32 result.

A regression in the model, the decode path or the shipped weights turns this red: on validation crops
(never used in training), InfGen's 2x decode of a 256^2 photo's latent must have a higher mean PSNR against
the 512^2 ground truth than the codec's own decode + bicubic upsampling of the same latent.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from infgen.images import pil_to_tensor
from infgen.metrics import lattice_differences, psnr
from infgen.pipeline import DEFAULT_BUNDLE, InfGenPipeline
from infgen.precision import fast_dtype

CROPS = sorted((Path(__file__).parent / "data" / "val_crops").glob("*.jpg"))
# Measured on the shipped bundle (fp32) by this file's protocol; see docs/training.md.
SHIPPED_2X, CODEC_BICUBIC_2X = 30.70, 30.67


@pytest.fixture(scope="module")
def pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(256^2 input, 512^2 ground truth) of the 6 committed validation crops, in [-1, 1]."""
    assert len(CROPS) == 6
    out = []
    for path in CROPS:
        im = Image.open(path).convert("RGB")
        out.append((pil_to_tensor(im.resize((256, 256), Image.LANCZOS)), pil_to_tensor(im)))
    return out


def test_bundle_is_shipped_and_loads_by_default():
    assert (DEFAULT_BUNDLE / "infgen" / "model.safetensors").is_file()
    assert (DEFAULT_BUNDLE / "codec" / "model.safetensors").is_file()
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE.rglob("*") if p.is_file())
    assert size < 50e6
    pipe = InfGenPipeline.from_pretrained()
    assert pipe.codec is not None and pipe.info.train_latent == 32
    assert pipe.model.config.scaling_factor == pipe.codec.scaling_factor
    assert pipe.model.config.latent_channels == pipe.codec.latent_channels == 16


def psnr_at_2x(pairs, pipe=None) -> tuple[float, float]:
    """Mean PSNR (dB) at 2x: (InfGen, codec decode + bicubic); fp32 unless `pipe` is given."""
    pipe = pipe or InfGenPipeline.from_pretrained()
    ours, baseline = [], []
    for inp, gt in pairs:
        z = pipe.encode(inp)
        assert z.shape == (1, 16, 32, 32)
        out = pipe.decode(z, 512, 512).float()
        base = F.interpolate(pipe.codec.decode(z).float(), size=(512, 512), mode="bicubic", align_corners=False)
        base = base.clamp(-1, 1)
        ours.append(psnr(out * 0.5 + 0.5, gt * 0.5 + 0.5))
        baseline.append(psnr(base * 0.5 + 0.5, gt * 0.5 + 0.5))
    return torch.cat(ours).mean().item(), torch.cat(baseline).mean().item()


def test_bundled_model_beats_codec_plus_bicubic_at_2x(pairs):
    ours, baseline = psnr_at_2x(pairs)
    assert baseline == pytest.approx(CODEC_BICUBIC_2X, abs=0.02)  # the baseline itself unchanged
    assert ours > baseline, f"InfGen 2x PSNR {ours:.2f} dB <= codec + bicubic {baseline:.2f} dB"
    assert ours >= SHIPPED_2X - 0.03, f"InfGen 2x PSNR {ours:.2f} dB fell below the shipped model's {SHIPPED_2X} dB"


@pytest.mark.skipif(fast_dtype("cpu") != torch.bfloat16, reason="auto is fp32 on this CPU: nothing to compare")
def test_auto_dtype_gives_the_fp32_quality(pairs):
    """The CLI's default (--dtype auto) is bf16 on this CPU, for InfGen and the codec's encoder; at 2x it must
    score within 0.05 dB of fp32."""
    from infgen.commands.common import load_pipeline
    fp32, _ = psnr_at_2x(pairs)
    pipe, what = load_pipeline(None, "cpu", "auto")
    assert what.endswith("bf16 (auto)") and pipe.codec.dtype == pipe.model.dtype == torch.bfloat16
    bf16, _ = psnr_at_2x(pairs, pipe)
    assert abs(bf16 - fp32) <= 0.05, f"bf16 {bf16:.3f} dB vs fp32 {fp32:.3f} dB"


@pytest.mark.parametrize("scale", [2, 4])
def test_no_latent_cell_grid(pairs, scale):
    """Lattice strength (metrics.lattice_differences: mean step across latent-cell borders over the same
    across the other 8-px token borders) at most 1.03x that of a bicubic resize of the input itself."""
    pipe = InfGenPipeline.from_pretrained()
    size = 256 * scale
    ours, bicubic = [], []
    for inp, _ in pairs:
        out = pipe.decode(pipe.encode(inp), size, size).float()
        ref = F.interpolate(inp, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
        ours.append(lattice_differences(out * 0.5 + 0.5, (8 * scale, 8 * scale))[0].tolist())
        bicubic.append(lattice_differences(ref * 0.5 + 0.5, (8 * scale, 8 * scale))[0].tolist())
    ratio = lambda rows: np.divide(*np.mean(rows, axis=0))                   # pooled, as `infgen eval`
    assert ratio(ours) <= 1.03 * ratio(bicubic), f"{scale}x lattice {ratio(ours):.3f} vs bicubic {ratio(bicubic):.3f}"

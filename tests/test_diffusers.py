"""InfGenVAE as a diffusers VAE: config contract, save/load, the one decode path, output size, real pipelines.

Everything is built offline from tiny random configs; nothing is downloaded.
"""
import copy

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import infgen.pipeline
from infgen import InfGen, InfGenConfig
from infgen.integrations.diffusers import InfGenVAE
from infgen.pipeline import InfGenPipeline, tensor_to_pil

# Cheap enough to decode a full 1920 x 1080 frame in about 2 s on a busy 2-core CPU.
MICRO = dict(hidden_size=16, depth=1, fourier_features=8, inpe_hidden=16, decoder_channels=(8, 4, 4, 4),
             decoder_blocks=0)


@pytest.fixture(scope="module")
def micro_vae() -> InfGenVAE:
    torch.manual_seed(0)
    return InfGenVAE.from_infgen(InfGen(InfGenConfig.preset("tiny", **MICRO)))


@pytest.fixture(scope="module")
def bundle_vae(tiny_bundle) -> InfGenVAE:
    return InfGenVAE.from_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=32).eval()


def _sd_parts(vae, unet) -> dict:
    from diffusers import DDIMScheduler
    return dict(vae=vae, unet=unet, scheduler=DDIMScheduler(), text_encoder=None, tokenizer=None,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _embeds() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(prompt_embeds=torch.randn(1, 77, 32, generator=g),
                negative_prompt_embeds=torch.randn(1, 77, 32, generator=g))


# -- config and checkpoints ----------------------------------------------------------------------------
def test_config_has_the_keys_pipelines_read(bundle_vae):
    cfg = bundle_vae.config
    assert 2 ** (len(cfg.block_out_channels) - 1) == 8          # pipelines' vae_scale_factor
    assert cfg.latent_channels == 4
    assert cfg.scaling_factor == bundle_vae.infgen.config.scaling_factor
    assert isinstance(cfg.shift_factor, float)                     # SD3/FLUX pipelines add it
    assert cfg.latents_mean is None and cfg.latents_std is None
    assert cfg.force_upcast is False
    assert cfg.codec_config["type"] == "KLAutoencoder"


def test_config_must_agree_with_infgen_config():
    with pytest.raises(ValueError, match="scaling_factor"):
        InfGenVAE(infgen_config=InfGenConfig.preset("tiny", **MICRO).to_dict(), scaling_factor=0.5)


def test_save_pretrained_from_pretrained_round_trip(bundle_vae, tmp_path):
    bundle_vae.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    loaded = InfGenVAE.from_pretrained(tmp_path)
    a, b = bundle_vae.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(bundle_vae.config)
    assert loaded.info == bundle_vae.info
    z = torch.randn(1, 4, 5, 7)
    torch.testing.assert_close(loaded.decode(z, height=45, width=61).sample,
                               bundle_vae.decode(z, height=45, width=61).sample, rtol=0, atol=0)


def test_from_pretrained_without_argument_loads_the_default_bundle(monkeypatch, tiny_bundle):
    monkeypatch.setattr(infgen.pipeline, "DEFAULT_BUNDLE", tiny_bundle)
    vae = InfGenVAE.from_pretrained()
    ref = InfGenPipeline.from_pretrained(tiny_bundle)
    assert vae.info == ref.info and vae.codec is not None
    z = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(vae.decode(z, height=50, width=70).sample, ref.decode(z, 50, 70), rtol=0, atol=0)
    by_path = InfGenVAE.from_pretrained(tiny_bundle, torch_dtype=torch.bfloat16)  # a bundle dir, like from_bundle
    assert by_path.dtype == torch.bfloat16 and by_path.info == ref.info


# -- decode --------------------------------------------------------------------------------------------
def test_decode_goes_through_the_pipeline_decode_path(bundle_vae):
    # a latent wider than a window (8 + 2 * 2 cells) and a scale above max_scale=2: windows + extrapolation
    z = torch.randn(1, 4, 13, 3)
    out = bundle_vae.decode(z, height=230, width=50).sample
    ref = InfGenPipeline(bundle_vae.infgen, bundle_vae.codec, bundle_vae.info).decode(z, 230, 50)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.allclose(out, bundle_vae.infgen.decode(z, 230, 50), atol=1e-3)  # not a bare model.decode


def test_decode_shapes_range_and_return_dict(micro_vae):
    z = torch.randn(2, 4, 5, 7)
    out = micro_vae.decode(z, generator=torch.Generator().manual_seed(0))
    assert out.sample.shape == (2, 3, 40, 56)                     # native 8x
    odd = micro_vae.decode(z, height=37, width=53).sample
    assert odd.shape == (2, 3, 37, 53) and odd.dtype == torch.float32
    assert torch.isfinite(odd).all() and odd.min() >= -1 and odd.max() <= 1
    (tup,) = micro_vae.decode(z, return_dict=False, height=37, width=53)
    torch.testing.assert_close(tup, odd, rtol=0, atol=0)
    tup.add_(1)                                                    # a normal tensor, not an inference tensor
    with pytest.raises(ValueError, match="both height and width"):
        micro_vae.decode(z, height=37)


def test_output_size_context_manager_and_setter(micro_vae):
    z = torch.randn(1, 4, 3, 4)
    try:
        micro_vae.set_output_size(30, 20)
        with micro_vae.output_size(17, 23):
            assert micro_vae.decode(z).sample.shape[-2:] == (17, 23)
            assert micro_vae.decode(z, height=9, width=11).sample.shape[-2:] == (9, 11)  # explicit wins
            with micro_vae.output_size(5, 6):
                assert micro_vae.decode(z).sample.shape[-2:] == (5, 6)
            assert micro_vae.decode(z).sample.shape[-2:] == (17, 23)
        assert micro_vae.decode(z).sample.shape[-2:] == (30, 20)                      # previous size back
        with pytest.raises(RuntimeError), micro_vae.output_size(8, 8):
            raise RuntimeError
        assert micro_vae.decode(z).sample.shape[-2:] == (30, 20)                      # restored on error too
        micro_vae.set_output_size(None)
        assert micro_vae.decode(z).sample.shape[-2:] == (24, 32)
        with pytest.raises(ValueError, match="width must be >= 1"):
            micro_vae.set_output_size(10, 0)
    finally:
        micro_vae.set_output_size(None)


def test_bf16(micro_vae):
    z = torch.randn(1, 4, 6, 5)
    ref = micro_vae.decode(z, height=47, width=39).sample
    vae = copy.deepcopy(micro_vae).to(torch.bfloat16)
    assert vae.dtype == torch.bfloat16 and vae.config.force_upcast is False
    out = vae.decode(z, height=47, width=39).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.05


# -- encode --------------------------------------------------------------------------------------------
def test_encode_returns_the_codec_posterior(bundle_vae, micro_vae):
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    dist = bundle_vae.encode(x).latent_dist
    mean, logvar = bundle_vae.codec.autoencoder.encode(x)
    assert dist.mean.shape == (2, 4, 8, 6)
    torch.testing.assert_close(dist.mean, mean)
    torch.testing.assert_close(dist.logvar, logvar)
    (same,) = bundle_vae.encode(x, return_dict=False)
    torch.testing.assert_close(same.mean, mean)
    with pytest.raises(ValueError, match="no encoder"):
        micro_vae.encode(x)


def test_forward_reconstructs_an_image_whose_size_is_not_a_multiple_of_8(bundle_vae):
    """forward = encode + decode at the input's size; the encoder pads 61 x 75 to 64 x 80, and the decode
    must cover the image, not stretch the padding into it."""
    x = torch.rand(1, 3, 61, 75) * 2 - 1
    z = bundle_vae.encode(x).latent_dist.mode()
    out = bundle_vae(x).sample
    assert out.shape == (1, 3, 61, 75)
    whole = bundle_vae.decode(z, height=64, width=80).sample        # the latent's full extent
    torch.testing.assert_close(out, whole[:, :, :61, :75], rtol=0, atol=1e-5)


def test_diffusers_autoencoderkl_codec_round_trips_and_encodes(tmp_path):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=[32, 64], norm_num_groups=32, latent_channels=4,
                       down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2).eval()
    vae = InfGenVAE.from_infgen(InfGen(InfGenConfig.preset("tiny", **MICRO)), codec=kl)
    assert vae.config.codec_config["type"] == "AutoencoderKL"
    vae.save_pretrained(tmp_path)
    loaded = InfGenVAE.from_pretrained(tmp_path)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded.encode(x).latent_dist.mean, kl.encode(x).latent_dist.mean)


# -- real pipelines, built offline ----------------------------------------------------------------------
def test_dit_pipeline_renders_1080p_from_an_8x8_latent(micro_vae):
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, norm_num_groups=16).eval()
    vae = copy.deepcopy(micro_vae)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DPMSolverMultistepScheduler(), id2label={0: "x"})
    with vae.output_size(1080, 1920):
        image = pipe(class_labels=[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (1920, 1080)
    pipe.to(torch.bfloat16)  # the pipeline casts every part; InfGen needs no fp32 upcast
    with vae.output_size(45, 70):
        image = pipe(class_labels=[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (70, 45)


def test_stable_diffusion_pipeline_renders_1080p_and_latents_decode_the_same(micro_vae, tiny_unet):
    pytest.importorskip("transformers", reason="diffusers' Stable Diffusion pipelines import transformers")
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(**_sd_parts(micro_vae, tiny_unet))
    assert pipe.vae_scale_factor == 8
    call = dict(**_embeds(), num_inference_steps=2, height=64, width=64)        # an 8 x 8 latent
    with micro_vae.output_size(1080, 1920):
        image = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (1920, 1080)
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8)
    out = micro_vae.decode(latents / micro_vae.config.scaling_factor, height=1080, width=1920).sample
    assert out.shape == (1, 3, 1080, 1920)
    diff = np.abs(np.asarray(tensor_to_pil(out[0]), dtype=int) - np.asarray(image, dtype=int))
    assert diff.max() <= 1                                         # same pixels, up to rounding


def test_img2img_pipeline_encodes_through_the_codec(bundle_vae, tiny_unet):
    pytest.importorskip("transformers", reason="diffusers' Stable Diffusion pipelines import transformers")
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image
    pipe = StableDiffusionImg2ImgPipeline(**_sd_parts(bundle_vae, tiny_unet))
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    with bundle_vae.output_size(81, 59):
        image = pipe(image=init, strength=0.5, num_inference_steps=2, **_embeds(),
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (59, 81)


def test_a_diffusers_codec_saved_as_pickle_is_refused(tmp_path):
    """load_codec passes use_safetensors=True: a .bin (pickle) VAE folder is an error, never unpickled."""
    from diffusers import AutoencoderKL
    from infgen.codecs import load_codec
    kl = AutoencoderKL(block_out_channels=[8, 8], norm_num_groups=8, latent_channels=4,
                       down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    kl.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert [p.suffix for p in (tmp_path / "bin").glob("diffusion_pytorch_model*")] == [".bin"]
    with pytest.raises(OSError, match="safetensors"):
        load_codec(tmp_path / "bin")
    kl.save_pretrained(tmp_path / "st")
    assert load_codec(tmp_path / "st").latent_channels == 4

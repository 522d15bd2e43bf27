"""InfGenPipeline: bundles, tiled encode, window decoding and training-free extrapolation."""
import numpy as np
import pytest
import torch
from PIL import Image

from infgen.checkpoint import CheckpointError
from infgen import InfGenPipeline
from infgen.pipeline import _fades, _window_starts, pil_to_tensor, tensor_to_pil


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return InfGenPipeline.from_pretrained(tiny_bundle)


def test_bundle_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    again = InfGenPipeline.from_pretrained(tmp_path)
    z = torch.randn(1, 4, 5, 6)
    torch.testing.assert_close(again.decode(z, 50, 60), pipe.decode(z, 50, 60), rtol=0, atol=0)
    assert again.info == pipe.info


def test_not_a_bundle(tmp_path):
    with pytest.raises(CheckpointError, match="not an infgen bundle"):
        InfGenPipeline.from_pretrained(tmp_path)


def test_tiled_encode_equals_full_encode(pipe):
    x = torch.rand(1, 3, 300, 260) * 2 - 1
    full = pipe.encode(x, tile=10_000)
    assert full.shape == (1, 4, 38, 33)
    torch.testing.assert_close(pipe.encode(x, tile=64), full, rtol=0, atol=1e-5)


def test_small_latent_decodes_in_one_pass_equal_to_model(pipe):
    z = torch.randn(2, 4, 8, 10)                     # within train_latent + margins: one pass
    torch.testing.assert_close(pipe.decode(z, 77, 91), pipe.model.decode(z, 77, 91), rtol=0, atol=0)


def test_window_decode_shape_and_continuity(pipe):
    z = torch.randn(1, 4, 30, 41)                    # larger than the tiny bundle's 8-cell training latent
    out = pipe.decode(z, 240, 328)
    assert out.shape == (1, 3, 240, 328)
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    small = pipe.decode(z, 12, 20)                   # 2 x 3 cells for 4 x 6 windows: some own no cell
    assert small.shape == (1, 3, 12, 20) and torch.isfinite(small).all()


def _constant_tokens(value, rendered):
    """Stands in for InfGen.tokens: `value` in every feature of every query; records how many it made."""
    def tokens(ctx, ys, xs, cells):
        rendered.append(len(ys) * len(xs))
        return torch.full((ctx.kv[0][0].shape[0], len(ys) * len(xs), 32), value)
    return tokens


def test_window_blend_normalises_weights(pipe, monkeypatch):
    """Every window making the same constant features must give that constant in every cell: windows cover
    the image and the blend weights sum to 1 (no dark seams, no gaps)."""
    monkeypatch.setattr(pipe.model, "tokens", _constant_tokens(0.3, []))
    z = torch.randn(1, 4, 30, 41)
    features = pipe._window_features(z, pipe.model.base_image(z), 237, 331, False)
    assert features.shape == (1, 30, 42, 32)                                # ceil(237 / 8) x ceil(331 / 8) cells
    torch.testing.assert_close(features, torch.full_like(features, 0.3))


def test_windows_render_only_what_they_own_plus_a_band(pipe, monkeypatch):
    """The margins are context, not output: the windows' tokens together cover the image's cells once plus
    the one-latent-cell bands (8-cell windows at ~1x here, so (8 + 2)^2 / 8^2 at most). Before the feature
    map each window also decoded, and made the tokens of, a halo of 7 cells for its decoder."""
    rendered = []
    monkeypatch.setattr(pipe.model, "tokens", _constant_tokens(0.0, rendered))
    z = torch.randn(1, 4, 30, 41)
    pipe._window_features(z, pipe.model.base_image(z), 237, 331, False)
    assert len(rendered) == 4 * 6
    assert sum(rendered) <= 1.5 * 30 * 42, sum(rendered) / (30 * 42)  # 1.49x


def test_window_fades_sum_to_one():
    for n, core, px in [(30, 8, 7.9), (8, 8, 8.0), (41, 8, 8.07), (100, 32, 14.6), (100, 32, 3.0)]:
        starts = _window_starts(n, core)
        assert starts[0] == 0 and starts[-1] + core >= n
        assert all(b - a <= core for a, b in zip(starts, starts[1:]))
        centres = (torch.arange(round(n * px), dtype=torch.float64) + 0.5) / px    # in latent cells
        for band in (0, 0.5, 1):
            fades = _fades(centres, starts, band)
            assert len(fades) == len(starts)
            torch.testing.assert_close(sum(fades), torch.ones_like(centres), rtol=0, atol=1e-12)
            edges = [float("-inf")] + starts[1:] + [float("inf")]
            for f, lo, hi in zip(fades, edges, edges[1:]):                    # 1 inside, 0 beyond the bands
                assert (f[(centres >= lo + band) & (centres < hi - band)] == 1).all()
                assert (f[(centres < lo - band) | (centres >= hi + band)] == 0).all()


def test_extrapolation_reaches_exact_size_through_reencoding(pipe, monkeypatch):
    z = torch.randn(1, 4, 4, 5)
    sizes = []
    original = pipe._decode_once
    monkeypatch.setattr(pipe, "_decode_once", lambda z, h, w, *a: sizes.append((h, w)) or original(z, h, w, *a))
    out = pipe.decode(z, 250, 300)                   # scale 7.8 > max_scale 2: steps of <= 2x
    assert out.shape == (1, 3, 250, 300)
    assert sizes[-1] == (250, 300) and len(sizes) == 3
    assert all(b[0] / a[0] <= 2.01 for a, b in zip(sizes, sizes[1:]))
    sizes.clear()
    assert pipe.decode(z, 250, 300, extrapolate=False).shape == (1, 3, 250, 300)
    assert sizes == [(250, 300)]


def test_bf16_pipeline_decodes_and_extrapolates(tiny_bundle):
    ref = InfGenPipeline.from_pretrained(tiny_bundle)
    pipe = InfGenPipeline.from_pretrained(tiny_bundle, dtype=torch.bfloat16)
    assert pipe.model.dtype == torch.bfloat16 and pipe.codec.dtype == torch.float32
    z = torch.randn(1, 4, 4, 5)
    out = pipe.decode(z, 250, 300)                   # extrapolation: bf16 images re-encoded by the fp32 codec
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 250, 300)
    assert (out.float() - ref.decode(z, 250, 300)).abs().mean() < 0.05


def test_upscale_pil(pipe):
    img = Image.new("RGB", (50, 34), (200, 10, 30))
    out = pipe.upscale(img, 68, 100)
    assert out.size == (100, 68) and out.mode == "RGB"
    with pytest.raises(TypeError, match="PIL.Image"):
        pipe.upscale(torch.zeros(3, 4, 4), 8, 8)


def test_pil_tensor_round_trip():
    img = Image.fromarray((torch.rand(7, 9, 3) * 255).to(torch.uint8).numpy())
    x = pil_to_tensor(img)
    assert x.shape == (1, 3, 7, 9) and x.min() >= -1 and x.max() <= 1
    assert (np.asarray(tensor_to_pil(x[0])) == np.asarray(img)).all()


def test_bad_sizes_and_latents_through_pipeline(pipe):
    with pytest.raises(ValueError, match="height must be >= 1"):
        pipe.decode(torch.randn(1, 4, 4, 4), 0, 10)
    with pytest.raises(ValueError, match="NaN"):
        pipe.decode(torch.full((1, 4, 4, 4), float("nan")), 10, 10)
    with pytest.raises(ValueError, match="\\(B, 3, h, w\\)"):
        pipe.encode(torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("bad,match", [({"max_step_scale": 1}, "max_step_scale must be a number > 1"),
                                       ({"train_latent": 0}, "train_latent must be an int >= 1"),
                                       ({"window_margin": "4"}, "window_margin must be an int"),
                                       ({"max_scle": 4}, "unknown bundle.json keys")])
def test_bad_bundle_json_is_a_checkpoint_error(tiny_bundle, tmp_path, bad, match):
    import json
    import shutil
    shutil.copytree(tiny_bundle, tmp_path / "b")
    info = json.loads((tmp_path / "b" / "bundle.json").read_text())
    (tmp_path / "b" / "bundle.json").write_text(json.dumps({**info, **bad}))
    with pytest.raises(CheckpointError, match=match):
        InfGenPipeline.from_pretrained(tmp_path / "b")


def test_bundle_command_round_trip(tiny_bundle, tmp_path, capsys):
    from infgen.cli import main
    rc = main(["bundle", "--infgen", str(tiny_bundle / "infgen"), "--codec", str(tiny_bundle / "codec"),
               "--out", str(tmp_path / "nb"), "--train-latent", "8", "--max-scale", "2", "--window-margin", "2"])
    assert rc == 0
    a, b = InfGenPipeline.from_pretrained(tmp_path / "nb"), InfGenPipeline.from_pretrained(tiny_bundle)
    assert a.info == b.info
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(a.decode(z, 40, 48), b.decode(z, 40, 48), rtol=0, atol=0)
    rc = main(["bundle", "--infgen", str(tiny_bundle / "infgen"), "--codec", str(tiny_bundle / "codec"),
               "--out", str(tmp_path / "nb2"), "--max-step-scale", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "max_step_scale must be a number > 1" in err and not (tmp_path / "nb2").exists()


def test_codec_from_another_latent_space_is_refused(pipe):
    from infgen import InfGen, InfGenConfig
    with pytest.raises(ValueError, match="trained on another latent space"):
        InfGenPipeline(InfGen(InfGenConfig.preset("tiny", scaling_factor=0.5)), pipe.codec)


@pytest.mark.parametrize("preset", ["tiny", "tiny-16ch"])
def test_latent_channels_come_from_the_codec(preset, tmp_path):
    """4- and 16-channel codecs: encode shapes, exact tiled encode, decodes, extrapolation and a bundle round
    trip, with the channel count taken from the codec and the InfGen config only."""
    from infgen import InfGen, InfGenConfig
    from infgen.autoencoder import AutoencoderConfig, KLAutoencoder
    from infgen.codecs import AutoencoderCodec
    from infgen.pipeline import BundleInfo

    ae = KLAutoencoder(AutoencoderConfig.preset(preset)).eval()
    C = ae.latent_channels
    assert C == (16 if preset.endswith("16ch") else 4)
    pipe = InfGenPipeline(InfGen(InfGenConfig.preset("tiny", latent_channels=C, scaling_factor=1.0)).eval(),
                          AutoencoderCodec(ae), BundleInfo(train_latent=8, max_scale=2.0, window_margin=2))
    x = torch.rand(1, 3, 300, 260) * 2 - 1
    z = pipe.encode(x, tile=10_000)
    assert z.shape == (1, C, 38, 33)
    torch.testing.assert_close(pipe.encode(x, tile=64), z, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert pipe.codec.decode(z).shape == (1, 3, 304, 264)
    assert pipe.decode(z[..., :8, :8], 50, 70).shape == (1, 3, 50, 70)      # one pass
    assert pipe.decode(z, 600, 520).shape == (1, 3, 600, 520)                # windows + extrapolation
    pipe.save_pretrained(tmp_path)
    again = InfGenPipeline.from_pretrained(tmp_path)
    assert again.codec.latent_channels == C and again.model.config.latent_channels == C
    with pytest.raises(ValueError, match=f"expects latent_channels={C}"):
        pipe.decode(torch.randn(1, 20 - C, 8, 8), 64, 64)                   # the other channel count


@pytest.fixture(scope="module")
def codec_pipe():
    """InfGen = the codec's decoder + bicubic resize exactly (base copied, tokens at zero): geometry is visible."""
    from infgen import InfGen, InfGenConfig
    from infgen.autoencoder import AutoencoderConfig, KLAutoencoder
    from infgen.codecs import AutoencoderCodec
    from infgen.pipeline import BundleInfo
    torch.manual_seed(0)
    ae = KLAutoencoder(AutoencoderConfig.preset("tiny")).eval()
    model = InfGen(InfGenConfig.preset("tiny", scaling_factor=1.0, base_channels=ae.config.decoder_channels,
                                       base_blocks=ae.config.decoder_depth)).eval()
    model.init_base_from(ae.decoder)
    return InfGenPipeline(model, AutoencoderCodec(ae), BundleInfo(train_latent=8, max_scale=2.0, window_margin=2))


def test_padded_input_decodes_the_image_not_its_padding(codec_pipe):
    """A 61 x 75 image is replicate-padded to 64 x 80 before encoding; at its own size the output must be
    the codec's reconstruction of those 61 x 75 px, not the padded 64 x 80 squeezed into them."""
    x = torch.rand(1, 3, 61, 75) * 2 - 1
    z = codec_pipe.encode(x)
    assert z.shape[-2:] == (8, 10)
    codec = codec_pipe.codec.decode(z)[:, :, :61, :75]
    torch.testing.assert_close(codec_pipe.decode(z, 61, 75, content=(61, 75)), codec.clamp(-1, 1), rtol=0, atol=1e-5)
    assert (codec_pipe.decode(z, 61, 75) - codec).abs().max() > 1e-2           # without content: squeezed
    image = Image.fromarray(((x[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    assert codec_pipe.upscale(image, 122, 150).size == (150, 122)             # upscale passes its size on


def test_extrapolation_steps_are_multiples_of_8(codec_pipe, monkeypatch):
    """Intermediate images fill their re-encoded latents exactly (a size like 233 would be padded to 240
    and the next step would stretch the padding into the picture)."""
    sizes = []
    original = codec_pipe._decode_once
    monkeypatch.setattr(codec_pipe, "_decode_once", lambda z, h, w, *a: sizes.append((h, w)) or original(z, h, w, *a))
    out = codec_pipe.decode(torch.randn(1, 4, 4, 5), 190, 233)                # 5.9x > max_scale 2: 3 steps
    assert out.shape == (1, 3, 190, 233) and len(sizes) == 3
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in sizes[:-1]), sizes


@pytest.mark.parametrize("content", [(56, 80), (65, 80), (64, 72), (64.0, 80), (64,), "64x80"])
def test_bad_content_is_refused(codec_pipe, content):
    with pytest.raises(ValueError, match=r"content must be the \(h, w\) px of the image a 8 x 10 latent"):
        codec_pipe.decode(torch.randn(1, 4, 8, 10), 64, 80, content=content)


def test_windows_use_the_whole_latents_base(codec_pipe):
    """The base is convolutional like the codec's decoder, so windows crop the base of the whole latent:
    with the tokens at zero a window decode is the codec's decode of the whole latent, resized (before,
    each window decoded its own base and its zero-padded edges showed in the owned pixels)."""
    z = torch.randn(1, 4, 30, 41)                                            # 4 x 6 windows of 8 + 2 x 2
    ref = torch.nn.functional.interpolate(codec_pipe.codec.decode(z), (480, 656), mode="bicubic",
                                          align_corners=False).clamp(-1, 1)
    torch.testing.assert_close(codec_pipe.decode(z, 480, 656), ref, rtol=0, atol=1e-5)


def test_a_base_of_the_wrong_size_is_refused(codec_pipe):
    """InfGen.context takes a base image the caller already has (the pipeline's windows pass their crop of
    the whole latent's): checked, and the same pixels as the base it decodes itself."""
    model, z = codec_pipe.model, torch.randn(1, 4, 6, 7)
    with pytest.raises(ValueError, match=r"base must be the base image of the 6 x 7 latent"):
        model.context(z, torch.zeros(1, 3, 40, 56))
    whole = model.base_image(z)
    with torch.no_grad():
        given, own = (model.render(ctx, 96, 112, (0, 0, 12, 14)) for ctx in (model.context(z, whole), model.context(z)))
    torch.testing.assert_close(given, own, rtol=0, atol=0)
    from infgen import InfGen, InfGenConfig
    plain = InfGen(InfGenConfig.preset("tiny")).eval()
    with pytest.raises(ValueError, match="this model has no base decoder"):
        plain.context(z, whole)


def test_windows_place_their_tokens_where_the_one_pass_decode_does(codec_pipe):
    """Windows stitch mask tokens computed in each window's own latent frame into one map of the whole
    image. With nothing that tells windows apart (no latent self-attention, a constant positional
    embedding) the stitched decode must equal the one-pass decode: query positions, scale, the seam-free
    attention window's falloff, base and decoder all line up exactly (a query placed even a fraction of a
    cell off in its window moves its attention weights)."""
    from infgen import InfGen, InfGenConfig
    torch.manual_seed(1)
    ref = codec_pipe.model
    model = InfGen(InfGenConfig.from_dict({**ref.config.to_dict(), "latent_depth": 0, "base_tokens": True})).eval()
    model.base.load_state_dict(ref.base.state_dict())
    torch.nn.init.normal_(model.decoder.conv_out.weight, std=0.3)             # a decoder that shows its tokens
    for p in [model.inpe.mlp[-1].weight, model.inpe.mlp[-1].bias]:         # no position: windows look alike
        torch.nn.init.zeros_(p)
    torch.nn.init.normal_(model.base_in.weight, std=0.1)
    pipe = InfGenPipeline(model, codec_pipe.codec, codec_pipe.info)
    z = torch.randn(1, 4, 30, 41)                                            # 4 x 6 windows of 8 + 2 x 2
    for size in [(480, 656), (237, 331)]:
        one_pass = model.decode(z, *size)
        tokens_part = one_pass - ref.decode(z, *size)                         # ref: the base alone
        assert tokens_part.std() > 0.05 and (one_pass.abs() < 1).float().mean() > 0.99, tokens_part.std()
        torch.testing.assert_close(pipe._decode_windows(z, *size, None, False), one_pass, rtol=0, atol=2e-5)


def test_decoding_stored_features_is_exact_in_any_tiling(codec_pipe):
    """decode_features renders the decoder half from stored mask tokens: with the one-pass tokens it gives
    the one-pass decode, also in tiles of 3 cells (each tile's halo is cut from the stored map)."""
    from infgen.layers import cell_centres
    model, z = codec_pipe.model, torch.randn(1, 4, 6, 7)
    torch.manual_seed(2)
    saved = model.decoder.conv_out.weight.clone()
    with torch.no_grad():
        torch.nn.init.normal_(model.decoder.conv_out.weight, std=0.3)         # tokens visible in the output
    try:
        with torch.no_grad():
            ctx = model.context(z)
            ys, xs = cell_centres(torch.arange(12), 8.0, 93), cell_centres(torch.arange(15), 8.0, 117)
            features = model.tokens(ctx, ys, xs, (12 / 6, 15 / 7)).view(1, 12, 15, -1)
        ref = model.decode(z, 93, 117)
        for chunk in (None, 3):
            torch.testing.assert_close(model.decode_features(features, ctx.base, 93, 117, chunk), ref,
                                       rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match=r"features must hold the 12 x 15 cells of a 93 x 117 image, got 12 x 14"):
            model.decode_features(features[:, :, :14], ctx.base, 93, 117)
        with pytest.raises(ValueError, match="base must be the latent's base image exactly when"):
            model.decode_features(features, None, 93, 117)
    finally:
        with torch.no_grad():
            model.decoder.conv_out.weight.copy_(saved)

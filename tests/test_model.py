"""Core contract of the InfGen decoder: shapes, exact tiled decoding, INPE, checkpoints, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from infgen import InfGen, InfGenConfig, layers
from infgen.checkpoint import CheckpointError
from infgen.layers import Windows, grid_coords

SIZES = [(1, 1), (17, 33), (64, 48), (1080, 1920)]


@pytest.mark.parametrize("height,width", SIZES)
def test_output_shape_and_range(tiny, height, width):
    out = tiny.decode(torch.randn(1, 4, 8, 8), height, width)
    assert out.shape == (1, 3, height, width)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("latent_hw,size", [((5, 9), (40, 72)), ((12, 4), (31, 100)), ((1, 1), (8, 8)),
                                            ((96 // 8, 168 // 8), (45, 77))])
def test_non_square_latents_and_batches(tiny, latent_hw, size):
    out = tiny.decode(torch.randn(2, 4, *latent_hw), *size)
    assert out.shape == (2, 3, *size)


def test_latent_4x96x168_small_preset_shape():
    model = InfGen(InfGenConfig.preset("small")).eval()
    assert 5e6 <= model.num_parameters() <= 20e6
    out = model.decode(torch.randn(1, 4, 96, 168), 40, 70)
    assert out.shape == (1, 3, 40, 70)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_global"])
@pytest.mark.parametrize("chunk", [1, 4, 11])
def test_chunked_decode_equals_plain(request, fixture, chunk):
    model = request.getfixturevalue(fixture)
    z = torch.randn(2, 4, 6, 9)
    # 29 x 37 cells: interior tiles whose halo does not reach the image border
    plain = model.decode(z, 229, 293, chunk_size=10_000)   # one tile = the plain decode
    chunked = model.decode(z, 229, 293, chunk_size=chunk)
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-5)
    # and the plain decode is the training forward, clamped
    with torch.no_grad():
        torch.testing.assert_close(model(z, 229, 293).clamp(-1, 1), plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("region,chunk", [((0, 0, 29, 37), None), ((3, 5, 7, 11), 2), ((25, 30, 4, 7), 3),
                                          ((28, 36, 1, 1), None), ((27, 30, 5, 9), 2)])   # the last: cut at the edge
def test_region_decode_is_the_crop_of_the_whole(tiny, region, chunk):
    z = torch.randn(2, 4, 6, 9)
    whole = tiny.decode(z, 229, 293)                        # 29 x 37 cells; the last row/col partial
    top, left, rows, cols = region
    crop = whole[:, :, 8 * top: 8 * (top + rows), 8 * left: 8 * (left + cols)]
    torch.testing.assert_close(tiny.decode(z, 229, 293, chunk, region=region), crop, rtol=0, atol=1e-5)


@pytest.mark.parametrize("region", [(0, 0, 0, 1), (-1, 0, 2, 2), (29, 0, 2, 1), (0, 37, 1, 2), (0, 0, 1.5, 1),
                                    (0, 0, 1), "0,0,1,1", (0, 0, True, 1)])
def test_bad_region_is_refused(tiny, region):
    with pytest.raises(ValueError, match=r"region must be \(top, left, rows, cols\) ints with 0 <= top < 29, "
                                         r"0 <= left < 37"):
        tiny.decode(torch.randn(1, 4, 6, 9), 229, 293, region=region)


@pytest.mark.parametrize("size,latent,rows,cols", [
    ((512, 512), (32, 32), (0, 64), (0, 64)),        # 2x: 2 x 2 queries per latent cell
    ((2160, 3840), (64, 64), (10, 60), (50, 130)),   # 4K tile, fractional ratios (4.2 x 7.5)
    ((37, 1000), (5, 9), (0, 5), (3, 125)),          # downscale on one axis, upscale on the other
    ((300, 200), (2, 7), (0, 38), (0, 25)),          # latent smaller than the window; partial last cell
    ((8, 8), (1, 1), (0, 1), (0, 1)),
    ((256, 256), (32, 32), (3, 29), (0, 32)),        # 1x: every query its own group
    ((128, 96), (32, 32), (0, 16), (0, 12)),         # 0.5x: one-query groups that skip latent cells
])
@pytest.mark.parametrize("max_heads", [65535, 7])  # 7: many SDPA calls, the CUDA head-limit split
def test_local_windows_equal_masked_full_attention(size, latent, rows, cols, max_heads, monkeypatch):
    """Grouped local attention == full attention masked to the 3x3 latent window of each query's cell."""
    monkeypatch.setattr(layers, "SDPA_MAX_HEADS", max_heads)
    (H, W), (h, w) = size, latent
    ri, ci = torch.arange(*rows), torch.arange(*cols)
    q = torch.randn(2, 4, len(ri) * len(ci), 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 4, h * w, 8, dtype=torch.float64).unbind(0)
    # Reference from first principles: the latent cell under each query's centre, the 3x3 block around
    # it shifted inside the latent, every other key masked out.
    yc = ((ri * 8 + 4) / H * h).floor().long()
    xc = ((ci * 8 + 4) / W * w).floor().long()
    y0 = (yc - 1).clamp(0, max(h - 3, 0))
    x0 = (xc - 1).clamp(0, max(w - 3, 0))
    ly, lx = torch.arange(h), torch.arange(w)
    in_y = (ly[None] >= y0[:, None]) & (ly[None] < y0[:, None] + 3)          # (nr, h)
    in_x = (lx[None] >= x0[:, None]) & (lx[None] < x0[:, None] + 3)          # (nc, w)
    mask = (in_y[:, None, :, None] & in_x[None, :, None, :]).reshape(len(ri) * len(ci), h * w)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = Windows.build((ri * 8 + 4) / H * h, (ci * 8 + 4) / W * w, h, w, 3).attend(q, k, v)
    torch.testing.assert_close(got, ref)
    # Seam-free windows: full attention over every latent token with the Hann-window bias of each key's
    # distance from the query's own coordinate (-inf beyond 1.5 cells) gives the same as the grouped form.
    py, px = (ri * 8 + 4) / H * h, (ci * 8 + 4) / W * w                      # queries, in latent cells
    by = layers.hann_log_weight(py[:, None] - (ly[None] + 0.5), 1.5)           # (nr, h)
    bx = layers.hann_log_weight(px[:, None] - (lx[None] + 0.5), 1.5)           # (nc, w)
    bias = (by[:, None, :, None] + bx[None, :, None, :]).reshape(len(ri) * len(ci), h * w).double()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    got = Windows.build(py, px, h, w, 3, falloff=True).attend(q, k, v)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("falloff", ["hann", "none"])
def test_token_features_are_continuous_across_latent_cell_borders(falloff):
    """At a 16x upscale neighbouring mask tokens are 1/16 latent cell apart. Seam-free windows: the step
    between two tokens on either side of a latent-cell border is no larger than between tokens inside a
    cell; the hard window (none) jumps there, which drew the latent-cell lattice at 4x."""
    torch.manual_seed(0)
    # A smooth INPE (low Fourier scale) and a strong attention output, so that what the attention brings
    # dominates the token features, as it does after training (at initialisation it is near zero).
    model = InfGen(InfGenConfig.preset("tiny", attn_window_falloff=falloff, fourier_scale=1.0)).eval()
    for blk in model.blocks:
        torch.nn.init.normal_(blk.proj.weight, std=0.5)
    z = torch.randn(1, 4, 6, 6)
    H = W = 8 * 16 * 6                                                         # 16 tokens per latent cell
    with torch.no_grad():
        ctx = model.context(z)
        rows, cols = torch.arange(40, 41), torch.arange(0, W // 8)             # one row of tokens
        f = model.tokens(ctx, (rows * 8 + 4) / H, (cols * 8 + 4) / W, (16, 16))[0]  # (W/8, D)
    step = (f[1:] - f[:-1]).norm(dim=-1)                                       # (W/8 - 1,) neighbour steps
    border = (cols[1:] % 16 == 0)                                              # pair straddles a cell border
    across, inside = step[border].max(), step[~border].max()
    if falloff == "hann":
        assert across <= inside, (float(across), float(inside))
    else:
        assert across > 3 * inside, (float(across), float(inside))            # the seam this test guards


def test_auto_chunking_with_small_budget_is_exact(tiny):
    z = torch.randn(1, 4, 4, 4)
    plain = tiny.decode(z, 100, 140, chunk_size=10_000)
    budget = tiny.bytes_per_cell(1) * (tiny.halo * 2 + 8) ** 2  # forces tiles of 8 cells
    assert tiny.auto_chunk_size(1, budget) == 8
    torch.testing.assert_close(tiny.decode(z, 100, 140, memory_budget=budget), plain, rtol=0, atol=1e-5)


def test_region_render_without_halo_is_exact_inside_the_receptive_field(tiny):
    """halo=False (training): pixels farther than the decoder's reach from the region's edge equal the full
    decode; the edge itself sees zero padding instead of the neighbouring cells and differs."""
    z = torch.randn(1, 4, 6, 6)
    r = tiny.decoder.radius_px
    with torch.no_grad():
        full = tiny(z, 400, 400)
        part = tiny(z, 400, 400, region=(12, 14, 16, 16), halo=False)        # 128 x 128 px from (96, 112)
    assert part.shape == (1, 3, 128, 128)
    crop = full[:, :, 96:224, 112:240]
    torch.testing.assert_close(part[:, :, r:-r, r:-r], crop[:, :, r:-r, r:-r], rtol=0, atol=1e-5)
    assert (part[:, :, :4] - crop[:, :, :4]).abs().max() > 1e-3


def test_region_render_equals_crop_of_full(tiny):
    # 38 x 42 cells: a region far from every border, so the halo (not the image edge) bounds its context
    z = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        full = tiny(z, 300, 333)
        part = tiny(z, 300, 333, region=(15, 17, 4, 5))
        assert part.shape == (1, 3, 32, 40)
        torch.testing.assert_close(part, full[:, :, 120:152, 136:176], rtol=0, atol=1e-5)
        edge = tiny(z, 300, 333, region=(36, 40, 5, 5))        # clipped at the bottom/right edge
        torch.testing.assert_close(edge, full[:, :, 288:300, 320:333], rtol=0, atol=1e-5)


def test_halo_is_needed(tiny):
    """The exactness above comes from the halo: with a 1-cell halo the region differs from the full decode.
    (The far edge of the receptive field contributes ~1e-6 with random weights, so only a clearly too small
    halo shows up reliably; the exactness tests above pin the full halo.)"""
    z = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        full = tiny(z, 300, 333)
        halo, tiny.halo = tiny.halo, 1
        try:
            part = tiny(z, 300, 333, region=(15, 17, 4, 5))
        finally:
            tiny.halo = halo
    assert (part - full[:, :, 120:152, 136:176]).abs().max() > 1e-4


def test_same_physical_coordinate_same_inpe(tiny):
    # token i of an 8-cell grid and token 3i+1 of a 24-cell grid have the same centre: (i + 0.5) / 8
    a = grid_coords(torch.arange(8), torch.arange(8), 8.0, 64, 64).view(8, 8, 2)
    b = grid_coords(torch.arange(24), torch.arange(24), 8.0, 192, 192).view(24, 24, 2)
    idx = torch.arange(8) * 3 + 1
    torch.testing.assert_close(a, b[idx][:, idx])
    with torch.no_grad():
        torch.testing.assert_close(tiny.inpe(a), tiny.inpe(b[idx][:, idx]))
    # latent grid (cell 1, extent h) and output grid (cell 8, extent 8h) agree too
    lat = grid_coords(torch.arange(8), torch.arange(8), 1.0, 8, 8)
    torch.testing.assert_close(lat, a.reshape(-1, 2))
    # non-multiple-of-8 sizes: coordinates are measured against the final extent, not the padded grid
    c = grid_coords(torch.arange(3), torch.arange(1), 8.0, 20, 8)
    torch.testing.assert_close(c[:, 0], torch.tensor([4 / 20, 12 / 20, 20 / 20]))


def test_inpe_distinguishes_positions(tiny):
    coords = grid_coords(torch.arange(16), torch.arange(16), 1.0, 16, 16)
    with torch.no_grad():
        emb = tiny.inpe(coords)
    d = torch.cdist(emb, emb) + torch.eye(len(emb)) * 1e9
    assert d.min() > 0


def test_bf16_decode_close_to_fp32(tiny):
    z = torch.randn(1, 4, 4, 6)
    ref = tiny.decode(z, 33, 47)
    model16 = InfGen(tiny.config).eval()
    model16.load_state_dict(tiny.state_dict())
    out = model16.to(torch.bfloat16).decode(z, 33, 47, chunk_size=2)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).abs().mean() < 0.05


def test_inpe_phases_stay_fp32_under_bf16_autocast(tiny):
    # bf16 phases (~100 rad with an 8-bit mantissa) would move every position by ~0.4 rad
    coords = torch.rand(64, 2)
    with torch.no_grad():
        ref = tiny.inpe(coords)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny.inpe(coords)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.02)


def test_backward_gives_finite_gradients_for_every_parameter():
    model = InfGen(InfGenConfig.preset("tiny")).train()
    out = model(torch.randn(2, 4, 4, 4), 40, 24)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(1)
    model = InfGen(InfGenConfig.preset("tiny")).train()
    z = torch.randn(1, 4, 4, 4)
    model(z, 32, 32).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(z, 32, 32).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6)


# -- checkpoints ---------------------------------------------------------------------------------------
def test_save_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = InfGen.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == tiny.config
    z = torch.randn(1, 4, 3, 5)
    torch.testing.assert_close(loaded.decode(z, 23, 41), tiny.decode(z, 23, 41), rtol=0, atol=0)


def test_the_same_weights_save_to_the_same_bytes(tiny, tmp_path):
    """safetensors writes its metadata from a hash map; the saved header is sorted, so saving the same
    module again gives the same file (a re-bundled codec is not a new blob in git)."""
    from safetensors import safe_open
    files = []
    for i in range(12):
        tiny.save_pretrained(tmp_path / str(i))
        files.append((tmp_path / str(i) / "model.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    with safe_open(tmp_path / "0" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "class": "InfGen"}
    torch.testing.assert_close(InfGen.from_pretrained(tmp_path / "0").state_dict(), tiny.state_dict(), rtol=0, atol=0)


def _corrupt(tiny, tmp_path, edit):
    tiny.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))


def test_strict_load_fails_on_renamed_key(tiny, tmp_path):
    _corrupt(tiny, tmp_path, lambda s: s.__setitem__("mask_tokenX", s.pop("mask_token")))
    with pytest.raises(CheckpointError, match=r"missing tensors \['mask_token'\].*unexpected tensors \['mask_tokenX'\]"):
        InfGen.from_pretrained(tmp_path)


def test_strict_load_fails_on_misshaped_key(tiny, tmp_path):
    _corrupt(tiny, tmp_path, lambda s: s.__setitem__("mask_token", torch.zeros(7)))
    with pytest.raises(CheckpointError, match=r"mask_token: expected \(32,\), got \(7,\)"):
        InfGen.from_pretrained(tmp_path)


def test_strict_load_fails_on_extra_key(tiny, tmp_path):
    _corrupt(tiny, tmp_path, lambda s: s.__setitem__("extra.weight", torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['extra.weight'\]"):
        InfGen.from_pretrained(tmp_path)


def test_unknown_config_key_is_an_error(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hiden_size"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown InfGen config keys \\['hiden_size'\\]"):
        InfGen.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hiden_size"):
        InfGenConfig.from_dict({"hiden_size": 3})


def test_pickle_is_refused_never_unpickled(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="pickle"):
        InfGen.from_pretrained(tmp_path)
    assert not marker.exists()


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        InfGen.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        InfGen.from_pretrained(tmp_path)


def test_state_dict_key_snapshot(tiny):
    """Renaming or reshaping a parameter breaks every saved checkpoint: it must be a deliberate change.
    Regenerate tests/snapshots/tiny_state_dict.json only together with a checkpoint migration."""
    snapshot = json.loads((Path(__file__).parent / "snapshots" / "tiny_state_dict.json").read_text())
    assert {k: list(v.shape) for k, v in tiny.state_dict().items()} == snapshot
    assert "mask_token" in snapshot and "inpe.fourier_matrix" in snapshot  # B travels with the weights


# -- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("z,err,match", [
    (torch.randn(4, 8, 8), ValueError, "shape \\(B, C, h, w\\), got 3 dims"),
    (torch.randn(1, 3, 8, 8), ValueError, "3 channels, this model expects latent_channels=4"),
    (torch.full((1, 4, 2, 2), float("nan")), ValueError, "NaN or Inf"),
    (torch.full((1, 4, 2, 2), float("inf")), ValueError, "NaN or Inf"),
    (torch.zeros(1, 4, 2, 2, dtype=torch.long), TypeError, "floating-point"),
    (torch.zeros(1, 4, 0, 2), ValueError, "non-empty"),
    ([[1.0]], TypeError, "torch.Tensor, got list"),
])
def test_bad_latents(tiny, z, err, match):
    with pytest.raises(err, match=match):
        tiny.decode(z, 16, 16)


@pytest.mark.parametrize("h,w,err,match", [
    (0, 16, ValueError, "height must be >= 1, got 0"),
    (16, -3, ValueError, "width must be >= 1, got -3"),
    (16.0, 16, TypeError, "height must be an int, got 16.0"),
    (16, "16", TypeError, "width must be an int"),
    (True, 16, TypeError, "height must be an int"),
    (16385, 16385, ValueError, "exceeds the cap"),
])
def test_bad_sizes(tiny, h, w, err, match):
    with pytest.raises(err, match=match):
        tiny.decode(torch.randn(1, 4, 2, 2), h, w)


def test_pixel_cap_is_configurable(tiny):
    with pytest.raises(ValueError, match="exceeds the cap of 100 pixels"):
        tiny.decode(torch.randn(1, 4, 2, 2), 11, 10, max_pixels=100)
    assert tiny.decode(torch.randn(1, 4, 2, 2), 11, 10, max_pixels=None).shape == (1, 3, 11, 10)


@pytest.mark.parametrize("chunk", [0, -1, 2.5])
def test_bad_chunk_size(tiny, chunk):
    with pytest.raises(ValueError, match="chunk_size"):
        tiny.decode(torch.randn(1, 4, 2, 2), 16, 16, chunk_size=chunk)


@pytest.mark.parametrize("overrides,match", [
    (dict(hidden_size=30, num_heads=4), "divisible"),
    (dict(attn_window=2), "odd"),
    (dict(decoder_channels=(8, 8)), "4 positive ints"),
    (dict(base_channels=(8, 8, 8)), "base_channels must be"),
    (dict(base_tokens=True), "base_tokens needs a base decoder"),
    (dict(depth=0), "depth must be >= 1"),
    (dict(scaling_factor=float("nan")), "finite"),
])
def test_bad_config(overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        InfGenConfig.preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown InfGen preset 'huge'"):
        InfGenConfig.preset("huge")


def test_presets_build():
    for name, lo, hi in [("tiny", 1e4, 1e6), ("small", 5e6, 20e6)]:
        n = InfGen(InfGenConfig.preset(name)).num_parameters()
        assert lo <= n <= hi, (name, n)
    base16 = InfGenConfig.preset("base-16ch")
    assert base16.latent_channels == 16 and 768 <= base16.hidden_size <= 1024
    assert 12 <= base16.depth + base16.latent_depth <= 16


@pytest.mark.parametrize("cmd", [["infgen", "--help"], [sys.executable, "-m", "infgen", "--help"]])
def test_cli_help(cmd):
    if cmd[0] == "infgen":
        cmd[0] = str(__import__("pathlib").Path(sys.executable).parent / "infgen")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "decode" in res.stdout and "train" in res.stdout and "upscale" in res.stdout


def test_saved_files_have_normal_permissions(tiny, tmp_path):
    import os
    import stat
    tiny.save_pretrained(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ["config.json", "model.safetensors"]:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask


def test_upsample_conv_equals_nearest_upsample_then_conv():
    from infgen.layers import upsample_conv
    conv = torch.nn.Conv2d(5, 7, 3, padding=1).double()
    x = torch.randn(2, 5, 6, 9, dtype=torch.float64)
    ref = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(upsample_conv(conv, x), ref, rtol=0, atol=1e-12)


# -- base decoder (config.base_channels) ---------------------------------------------------------------------
@pytest.mark.parametrize("top,left,rows,cols,height,width", [
    (0, 0, 34, 46, 34, 46), (5, 7, 9, 11, 68, 50), (0, 90, 40, 10, 40, 100), (0, 0, 17, 23, 17, 23)])
def test_resample_equals_crop_of_bicubic_resize(top, left, rows, cols, height, width):
    x = torch.randn(2, 3, 17, 23, dtype=torch.float64)
    full = torch.nn.functional.interpolate(x, (height, width), mode="bicubic", align_corners=False)
    out = layers.resample(x, top, left, rows, cols, height, width)
    torch.testing.assert_close(out, full[:, :, top:top + rows, left:left + cols], rtol=0, atol=1e-12)


def base_model_from(ae):
    cfg = InfGenConfig.preset("tiny", base_channels=ae.config.decoder_channels, base_blocks=ae.config.decoder_depth)
    return InfGen(cfg).eval()


@pytest.mark.parametrize("height,width", [(32, 48), (64, 96), (77, 150), (20, 30)])
def test_base_from_codec_decodes_codec_plus_bicubic_before_training(height, width):
    """init_base_from: at step 0 a decode at any size is the codec's decode resized bicubically, and tiles
    of it are exact (the base is sampled per output pixel)."""
    from infgen.autoencoder import AutoencoderConfig, KLAutoencoder
    torch.manual_seed(0)
    ae = KLAutoencoder(AutoencoderConfig.preset("tiny")).eval()
    model = base_model_from(ae)
    z = torch.randn(2, 4, 4, 6)
    before = model.decode(z, height, width)
    model.init_base_from(ae.decoder)
    with torch.no_grad():
        ref = torch.nn.functional.interpolate(ae.decode(z), (height, width), mode="bicubic", align_corners=False)
    out = model.decode(z, height, width)
    torch.testing.assert_close(out, ref.clamp(-1, 1), rtol=0, atol=1e-5)
    assert (before - out).abs().max() > 1e-2                                   # the init changed the model
    torch.testing.assert_close(model.decode(z, height, width, chunk_size=1), out, rtol=0, atol=1e-5)


def test_base_model_trains_every_parameter_and_round_trips(tmp_path):
    from infgen.autoencoder import AutoencoderConfig, KLAutoencoder
    ae = KLAutoencoder(AutoencoderConfig.preset("tiny"))
    model = base_model_from(ae).train()
    model(torch.randn(2, 4, 4, 4), 40, 24).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.save_pretrained(tmp_path / "m")
    loaded = InfGen.from_pretrained(tmp_path / "m")
    assert loaded.config.base_channels == ae.config.decoder_channels
    z = torch.randn(1, 4, 3, 5)
    torch.testing.assert_close(loaded.decode(z, 50, 70), model.eval().decode(z, 50, 70), rtol=0, atol=0)


def test_init_base_from_refuses_a_mismatched_decoder():
    from infgen.autoencoder import AutoencoderConfig, KLAutoencoder
    ae = KLAutoencoder(AutoencoderConfig.preset("tiny"))
    with pytest.raises(ValueError, match="needs base_channels"):
        InfGen(InfGenConfig.preset("tiny")).init_base_from(ae.decoder)
    other = InfGen(InfGenConfig.preset("tiny", base_channels=(8, 8, 8, 8)))
    with pytest.raises(ValueError, match="does not match base_channels"):
        other.init_base_from(ae.decoder)


def test_base_tokens_start_at_zero_and_tile_exactly():
    """base_tokens: each mask token also sees the 8x8 px of the resized base under it. Zero-initialised,
    so adding it to a trained model changes nothing; trained (here: random), tiles stay exact."""
    from infgen.autoencoder import AutoencoderConfig, KLAutoencoder
    torch.manual_seed(0)
    ae = KLAutoencoder(AutoencoderConfig.preset("tiny")).eval()
    plain = base_model_from(ae)
    model = InfGen(InfGenConfig.preset("tiny", base_channels=ae.config.decoder_channels, base_tokens=True)).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    z = torch.randn(2, 4, 4, 6)
    torch.testing.assert_close(model.decode(z, 77, 150), plain.decode(z, 77, 150), rtol=0, atol=0)
    torch.nn.init.normal_(model.base_in.weight, std=1.0)
    out = model.decode(z, 77, 150)
    assert (out - plain.decode(z, 77, 150)).abs().max() > 1e-2
    torch.testing.assert_close(model.decode(z, 77, 150, chunk_size=1), out, rtol=0, atol=1e-5)
    with torch.no_grad():                                  # a training region sees the same base
        torch.testing.assert_close(model(z, 77, 150, region=(2, 3, 4, 5)).clamp(-1, 1),
                                   out[:, :, 16:48, 24:64], rtol=0, atol=1e-5)

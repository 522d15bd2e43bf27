"""`infgen decode / upscale / demo` run in-process: outputs of the exact size, and every bad input gives one
line on stderr, exit code 2, no traceback and no file (not even a temp file) left behind."""
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from infgen.cli import main
from infgen.pipeline import InfGenPipeline


class Canary:
    """Unpickling this creates a file: proof that a loader ran pickle code (it must never)."""
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_failed(rc, err, out_dir: Path, message: str):
    """out_dir: where outputs would go, inside the test's tmp_path (stripped from err: test names are in it)."""
    assert rc == 2, err
    assert message in err.replace(str(out_dir.parent), "<tmp>"), err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr, got {err!r}"
    assert "Traceback" not in err
    left = sorted(p.name for p in out_dir.rglob("*")) if out_dir.exists() else []
    assert left == [], f"files left behind: {left}"


def size_of(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


@pytest.fixture
def z() -> torch.Tensor:
    return torch.randn(4, 8, 8)


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "in" / "photo.jpg"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def write_latent(path: Path, z: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        named = {"latents": z.contiguous(), "extra": torch.zeros(2)}
        save_file(named if "named" in path.name else {"z": z.contiguous()}, path)
    elif path.suffix == ".npy":
        np.save(path, z.numpy())
    else:
        torch.save({"latents": z}, path)
    return path


# -- decode ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["z.safetensors", "named.safetensors", "z.npy", "z.pt"])
def test_decode_formats_exact_size(capsys, tmp_path, tiny_bundle, z, name):
    src = write_latent(tmp_path / name, z)
    rc, out, err = cli(capsys, "decode", src, "--height", 37, "--width", 53, "-o", tmp_path / "out.png",
                       "--checkpoint", tiny_bundle)
    assert rc == 0, err
    assert size_of(tmp_path / "out.png") == (53, 37)
    assert "out.png" in out


def test_decode_batch_and_folder(capsys, tmp_path, tiny_bundle, z):
    write_latent(tmp_path / "lat" / "a.npy", z)
    write_latent(tmp_path / "lat" / "b.pt", torch.stack([z, -z]))           # (2, C, h, w) -> b_0, b_1
    (tmp_path / "lat" / "notes.txt").write_text("ignored")
    rc, _, err = cli(capsys, "decode", tmp_path / "lat", "--height", 24, "--width", 40, "-o", tmp_path / "out",
                     "--checkpoint", tiny_bundle, "-q")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b_0.png", "b_1.png"]
    assert all(size_of(p) == (40, 24) for p in (tmp_path / "out").iterdir())
    # one file with a batch -> OUT_<i>.png
    rc, _, err = cli(capsys, "decode", tmp_path / "lat" / "b.pt", "--height", 16, "--width", 8,
                     "-o", tmp_path / "single" / "img.png", "--checkpoint", tiny_bundle, "-q")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["img_0.png", "img_1.png"]


def test_decode_bare_infgen_checkpoint(capsys, tmp_path, tiny_bundle, z):
    src = write_latent(tmp_path / "z.npy", z)
    rc, out, err = cli(capsys, "decode", src, "--height", 20, "--width", 30, "-o", tmp_path / "o.jpg",
                       "--checkpoint", tiny_bundle / "infgen")
    assert rc == 0, err
    assert size_of(tmp_path / "o.jpg") == (30, 20)
    assert "no codec" in out


def test_decode_extrapolates_beyond_trained_scale(capsys, tmp_path, tiny_bundle, monkeypatch):
    """max_scale=2: a 4x4 latent (32 px) to 150x100 is ~4.7x, reached by decode -> re-encode -> decode."""
    calls = []
    encode = InfGenPipeline.encode
    monkeypatch.setattr(InfGenPipeline, "encode", lambda self, x, **k: calls.append(x.shape) or encode(self, x, **k))
    src = write_latent(tmp_path / "z.safetensors", torch.randn(1, 4, 4, 4))
    rc, _, err = cli(capsys, "decode", src, "--height", 100, "--width", 150, "-o", tmp_path / "big.png",
                     "--checkpoint", tiny_bundle, "-q")
    assert rc == 0, err
    assert size_of(tmp_path / "big.png") == (150, 100)
    assert len(calls) == 2                                          # ceil(log2(4.7)) = 3 steps, 2 re-encodes
    calls.clear()
    rc, _, err = cli(capsys, "decode", src, "--height", 100, "--width", 150, "-o", tmp_path / "one.png",
                     "--checkpoint", tiny_bundle, "-q", "--no-extrapolate", "--chunk-size", 4)
    assert rc == 0, err
    assert size_of(tmp_path / "one.png") == (150, 100) and calls == []


# -- upscale -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts,size", [(["--scale", "1.66"], (66, 50)), (["--size", "50x20"], (50, 20)),
                                       (["--height", "21", "--width", "13"], (13, 21)),
                                       (["--scale", "3", "--dtype", "bf16"], (120, 90))])
def test_upscale_sizes(capsys, tmp_path, tiny_bundle, photo, opts, size):
    rc, _, err = cli(capsys, "upscale", photo, *opts, "-o", tmp_path / "up.png", "--checkpoint", tiny_bundle)
    assert rc == 0, err
    assert size_of(tmp_path / "up.png") == size


@pytest.mark.parametrize("fast_bf16,expected", [(True, "bf16"), (False, "fp32")])
def test_default_dtype_is_picked_from_the_cpu_and_printed(capsys, tmp_path, tiny_bundle, photo, monkeypatch,
                                                           fast_bf16, expected):
    """--dtype auto (the default): bf16 where the CPU has AVX512-BF16/AMX, fp32 elsewhere; the line says so."""
    from infgen import precision
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    seen = []
    monkeypatch.setattr(InfGenPipeline, "decode", lambda self, *a, **k: seen.append(self.model.dtype) or
                        torch.zeros(1, 3, 45, 60))
    rc, out, err = cli(capsys, "upscale", photo, "--scale", "1.5", "-o", tmp_path / "up.png", "--checkpoint", tiny_bundle)
    assert rc == 0, err
    assert seen == [{"bf16": torch.bfloat16, "fp32": torch.float32}[expected]]
    assert f", {expected} (auto)" in out


def test_upscale_many_images_to_folder(capsys, tmp_path, tiny_bundle, photo):
    Image.new("RGBA", (16, 24), (0, 0, 255, 128)).save(photo.parent / "second.png")
    rc, _, err = cli(capsys, "upscale", photo, photo.parent / "second.png", "--scale", "0.5",
                     "-o", tmp_path / "out", "--checkpoint", tiny_bundle, "-q")
    assert rc == 0, err
    assert size_of(tmp_path / "out" / "photo.png") == (20, 15)
    assert size_of(tmp_path / "out" / "second.png") == (8, 12)


def test_upscale_needs_one_size_option(capsys, tmp_path, tiny_bundle, photo):
    for opts in ([], ["--scale", "2", "--size", "8x8"], ["--width", "8"]):
        with pytest.raises(SystemExit) as e:
            main(["upscale", str(photo), *opts, "-o", str(tmp_path / "o" / "x.png")])
        assert e.value.code == 2
        assert "--scale" in capsys.readouterr().err
    rc, _, err = cli(capsys, "upscale", photo, "--height", 8, "-o", tmp_path / "o" / "x.png",
                     "--checkpoint", tiny_bundle)
    assert_failed(rc, err, tmp_path / "o", "--width")


# -- bad input: one line, exit 2, nothing written ----------------------------------------------------------
def _truncated_jpeg(path: Path) -> None:
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bomb_png(path: Path, width=20000, height=20000) -> None:
    """A valid PNG header claiming 400 MP: refused from the header, before any pixel is decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


BAD_IMAGES = {
    "missing": (lambda p: None, "no such file"),
    "empty": (lambda p: p.write_bytes(b""), "empty"),
    "not-an-image": (lambda p: p.write_text("hello, I am a text file"), "not a readable image"),
    "truncated": (_truncated_jpeg, "cannot decode"),
    "bomb": (lambda p: _bomb_png(p), "decompression-bomb"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_upscale_bad_images(capsys, tmp_path, tiny_bundle, case):
    make, message = BAD_IMAGES[case]
    src = tmp_path / ("x.png" if case == "bomb" else "x.jpg")
    make(src)
    rc, _, err = cli(capsys, "upscale", src, "--scale", 2, "-o", tmp_path / "out" / "y.png",
                     "--checkpoint", tiny_bundle)
    assert_failed(rc, err, tmp_path / "out", message)
    assert Image.MAX_IMAGE_PIXELS == 89478485           # PIL's global guard is restored


@pytest.mark.parametrize("opts,message", [
    (["--size", "7680*4320"], "WIDTHxHEIGHT"), (["--size", "0x10"], ">= 1"), (["--size=-5x3"], ">= 1"),
    (["--size", "axb"], "WIDTHxHEIGHT"), (["--scale", "0"], "positive"), (["--scale", "0.001"], ">= 1"),
    (["--size", "20000x20000"], "exceeds the cap"), (["--size", "20x20", "--max-pixels", "100"], "exceeds the cap"),
    (["--scale", "2", "--max-input-pixels", "1000"], "decompression-bomb"),
    (["--scale", "2", "--checkpoint", "INFGEN"], "has none"),
])
def test_upscale_bad_sizes(capsys, tmp_path, tiny_bundle, photo, opts, message):
    opts = [str(tiny_bundle / "infgen") if o == "INFGEN" else o for o in opts]
    ckpt = [] if "--checkpoint" in opts else ["--checkpoint", tiny_bundle]
    rc, _, err = cli(capsys, "upscale", photo, *opts, "-o", tmp_path / "out" / "y.png", *ckpt)
    assert_failed(rc, err, tmp_path / "out", message)


def _latent_case(tmp_path: Path, case: str) -> Path:
    canary = Canary(tmp_path.parent / "unpickled")
    p = tmp_path / {"pickle-safetensors": "z.safetensors", "needs-unpickling": "z.pt", "object-npy": "z.npy",
                    "garbage-pt": "z.pt", "empty": "z.npy", "missing": "z.npy", "two-tensors": "z.safetensors",
                    "5d": "z.npy", "ints": "z.npy", "txt": "z.txt"}.get(case, "z.npy")
    if case == "pickle-safetensors":
        torch.save({"latents": torch.randn(4, 8, 8), "meta": canary}, p)
    elif case == "needs-unpickling":
        torch.save({"latents": torch.randn(4, 8, 8), "meta": canary}, p)
    elif case == "object-npy":
        np.save(p, np.array([canary], dtype=object), allow_pickle=True)
    elif case == "garbage-pt":
        p.write_bytes(pickle.dumps("x")[:3] + b"garbage")
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "two-tensors":
        save_file({"a": torch.zeros(4, 8, 8), "b": torch.zeros(4, 8, 8)}, p)
    elif case == "nan":
        z = np.random.randn(4, 8, 8).astype(np.float32)
        z[1, 2, 3] = np.nan
        np.save(p, z)
    elif case == "channels":
        np.save(p, np.zeros((3, 8, 8), np.float32))
    elif case == "5d":
        np.save(p, np.zeros((1, 1, 4, 8, 8), np.float32))
    elif case == "ints":
        np.save(p, np.zeros((4, 8, 8), np.int64))
    elif case == "txt":
        p.write_text("1 2 3")
    return p


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"), ("empty", "empty"), ("pickle-safetensors", "never unpickles"),
    ("needs-unpickling", "open) that needs unpickling"), ("object-npy", "not a plain numeric"),
    ("garbage-pt", "not a readable torch.save"),
    ("two-tensors", "'latents'"), ("nan", "NaN"), ("channels", "3 channels"), ("5d", "(B, C, h, w)"),
    ("ints", "floating"), ("txt", "unsupported"),
])
def test_decode_bad_latents(capsys, tmp_path, tiny_bundle, case, message):
    (tmp_path / "src").mkdir()
    src = _latent_case(tmp_path / "src", case)
    rc, _, err = cli(capsys, "decode", src, "--height", 16, "--width", 16, "-o", tmp_path / "out" / "y.png",
                     "--checkpoint", tiny_bundle)
    assert_failed(rc, err, tmp_path / "out", message)
    assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("opts,message", [
    (["--height", "0", "--width", "16"], "height must be >= 1"),
    (["--height", "16", "--width", "-3"], "width must be >= 1"),
    (["--height", "20000", "--width", "20000"], "exceeds the cap"),
    (["--height", "64", "--width", "64", "--max-pixels", "1000"], "exceeds the cap"),
    (["--height", "16", "--width", "16", "--chunk-size", "0"], "--chunk-size"),
    (["--height", "16", "--width", "16", "--checkpoint", "NOTCKPT"], "neither an infgen bundle"),
    (["--height", "16", "--width", "16", "--checkpoint", "MISSING"], "no such directory"),
    (["--height", "16", "--width", "16", "-o", "OUT.xyz"], "unknown image file type"),
    (["--height", "16", "--width", "16", "--dtype", "fp16"], "on CPU use bf16"),
    pytest.param(["--height", "16", "--width", "16", "--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_decode_bad_options(capsys, tmp_path, tiny_bundle, z, opts, message):
    src = write_latent(tmp_path / "src" / "z.npy", z)
    (tmp_path / "notckpt").mkdir()
    (tmp_path / "notckpt" / "readme.txt").write_text("not a checkpoint")
    sub = {"NOTCKPT": tmp_path / "notckpt", "MISSING": tmp_path / "nope", "OUT.xyz": tmp_path / "out" / "y.xyz"}
    opts = [str(sub.get(o, o)) for o in opts]
    extra = ([] if "-o" in opts else ["-o", tmp_path / "out" / "y.png"]) + \
        ([] if "--checkpoint" in opts else ["--checkpoint", tiny_bundle])
    rc, _, err = cli(capsys, "decode", src, *opts, *extra)
    assert_failed(rc, err, tmp_path / "out", message)


def test_outputs_never_overwrite_inputs_or_collide(capsys, tmp_path, tiny_bundle, z):
    a, b = write_latent(tmp_path / "a" / "z.npy", z), write_latent(tmp_path / "b" / "z.pt", z)
    rc, _, err = cli(capsys, "decode", a, b, "--height", 8, "--width", 8, "-o", tmp_path / "out",
                     "--checkpoint", tiny_bundle)
    assert_failed(rc, err, tmp_path / "out", "same output file")
    img = tmp_path / "imgs" / "p.png"
    img.parent.mkdir()
    Image.new("RGB", (8, 8)).save(img)
    before = img.read_bytes()
    rc, _, err = cli(capsys, "upscale", img.parent, "--scale", 2, "-o", img.parent, "--checkpoint", tiny_bundle)
    assert rc == 2 and "overwrite an input" in err and img.read_bytes() == before


def test_several_outputs_need_a_folder(capsys, tmp_path, tiny_bundle, z):
    a, b = write_latent(tmp_path / "a.npy", z), write_latent(tmp_path / "b.npy", z)
    rc, _, err = cli(capsys, "decode", a, b, "--height", 8, "--width", 8, "-o", tmp_path / "out" / "y.png",
                     "--checkpoint", tiny_bundle)
    assert_failed(rc, err, tmp_path / "out", "looks like a file name")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("x")
    rc, _, err = cli(capsys, "decode", a, b, "--height", 8, "--width", 8, "-o", tmp_path / "out" / "file",
                     "--checkpoint", tiny_bundle)
    assert rc == 2 and "is a file" in err and (tmp_path / "out" / "file").read_text() == "x"


def test_failed_write_leaves_no_temp_file(capsys, tmp_path, tiny_bundle, z, monkeypatch):
    src = write_latent(tmp_path / "src" / "z.npy", z)

    def disk_full(a, b):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("os.replace", disk_full)
    (tmp_path / "out").mkdir()
    rc, _, err = cli(capsys, "decode", src, "--height", 8, "--width", 8, "-o", tmp_path / "out" / "y.png",
                     "--checkpoint", tiny_bundle)
    assert_failed(rc, err, tmp_path / "out", "No space left")


# -- demo --------------------------------------------------------------------------------------------------
def test_demo_upscales_samples(capsys, tmp_path, tiny_bundle, photo):
    rc, out, err = cli(capsys, "demo", "--checkpoint", tiny_bundle, "--output", tmp_path / "demo",
                       "--sizes", "48x32,64x16", "--samples", photo.parent)
    assert rc == 0, err
    report = json.loads((tmp_path / "demo" / "timings.json").read_text())
    assert report["trained"] is True and [r["size"] for r in report["rows"]] == ["48x32", "64x16"]
    assert size_of(tmp_path / "demo" / "photo_48x32_infgen.png") == (48, 32)
    assert size_of(tmp_path / "demo" / "photo_64x16_bicubic.png") == (64, 16)
    assert (tmp_path / "demo" / "photo_64x16_input.png").is_file()
    assert "| photo.jpg" in (tmp_path / "demo" / "timings.md").read_text() and "MP/s" in out


def test_demo_without_samples_or_bundle(capsys, tmp_path, tiny_bundle, photo, monkeypatch):
    rc, out, err = cli(capsys, "demo", "--checkpoint", tiny_bundle, "--output", tmp_path / "d1", "--sizes", "24x16",
                       "--samples", tmp_path / "none")
    assert rc == 0, err
    assert "random latent" in out and size_of(tmp_path / "d1" / "random_24x16.png") == (24, 16)
    # no bundled weights installed: untrained `small` preset, said loudly
    monkeypatch.setattr("infgen.pipeline.DEFAULT_BUNDLE", tmp_path / "no-bundle")
    rc, out, err = cli(capsys, "demo", "--output", tmp_path / "d2", "--sizes", "16x16", "--samples", photo.parent)
    assert rc == 0, err
    assert "UNTRAINED" in out and "UNTRAINED" in (tmp_path / "d2" / "timings.md").read_text()
    report = json.loads((tmp_path / "d2" / "timings.json").read_text())
    assert report["trained"] is False and report["rows"][0]["input"] == "random latent 4x64x64"
    assert size_of(tmp_path / "d2" / "random_16x16.png") == (16, 16)


def test_default_checkpoint_missing_is_one_line(capsys, tmp_path, z, monkeypatch):
    monkeypatch.setattr("infgen.pipeline.DEFAULT_BUNDLE", tmp_path / "no-bundle")
    src = write_latent(tmp_path / "z.npy", z)
    rc, _, err = cli(capsys, "decode", src, "--height", 8, "--width", 8, "-o", tmp_path / "out" / "y.png")
    assert_failed(rc, err, tmp_path / "out", "--checkpoint")


@pytest.mark.parametrize("cmd", sorted(__import__("infgen.cli").cli.COMMANDS))
def test_help(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: infgen " + cmd in capsys.readouterr().out


def test_missing_optional_dependency_is_one_line(monkeypatch, capsys):
    import infgen.commands.decode as decode_cmd

    def boom(args):
        raise ImportError("No module named 'diffusers'")
    monkeypatch.setattr(decode_cmd, "run", boom)
    rc = main(["decode", "x.npy", "--height", "8", "--width", "8", "-o", "y.png"])
    err = capsys.readouterr().err
    assert rc == 2 and "optional dependency" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["symlink_loop", "parent_is_a_file", "read_only_fs"])
def test_unusable_output_paths_fail_before_decoding(capsys, tmp_path, tiny_bundle, photo, monkeypatch, case):
    """Path errors are one line and exit 2, found before any decode (the decode is never called)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if case == "symlink_loop":
        (out_dir / "loop.png").symlink_to(out_dir / "loop.png")
        target, message = out_dir / "loop.png", "cannot resolve the path"
    elif case == "parent_is_a_file":
        (out_dir / "file").write_text("x")
        target, message = out_dir / "file" / "sub" / "x.png", "is not a folder"
    else:   # root ignores permission bits, so fake what a read-only filesystem answers to a new file
        import tempfile
        def refuse(*a, **k):
            raise OSError(30, "Read-only file system")
        monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
        target, message = out_dir / "x.png", "cannot write outputs to"
    monkeypatch.setattr(InfGenPipeline, "decode", lambda *a, **k: pytest.fail("decoded before checking the output"))
    rc, _, err = cli(capsys, "upscale", photo, "--scale", "2", "-o", target, "--checkpoint", tiny_bundle)
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_demo_input_is_the_native_crop_unless_larger_than_side():
    from infgen.commands.demo import demo_input
    rng = np.random.default_rng(1)
    sample = Image.fromarray(rng.integers(0, 255, (384, 512, 3), dtype=np.uint8))   # a bundled sample's size
    native = demo_input(sample, 1080, 1920, 512)
    assert native.size == (512, 288)                                                # never enlarged
    assert np.array_equal(np.asarray(native), np.asarray(sample)[48:336])           # the centred crop itself
    assert demo_input(sample, 512, 2048, 512).size == (512, 128)
    assert demo_input(sample, 1080, 1920, 256).size == (344, 192)                   # shrunk by area
    big = Image.fromarray(rng.integers(0, 255, (1500, 2000, 3), dtype=np.uint8))
    assert demo_input(big, 1080, 1920, 512).size == (680, 384)

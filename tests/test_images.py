"""One image reader for every tool: each PIL mode to the expected RGB values, EXIF rotation, bad files."""
import numpy as np
import pytest
import torch
from PIL import Image

from infgen import data, images, photo_cache
from infgen.images import open_rgb, pil_to_tensor, save_image, tensor_to_pil


def pixel(path, xy=(0, 0)):
    return open_rgb(path).getpixel(xy)


@pytest.mark.parametrize("make,suffix,expected", [
    (lambda: Image.new("L", (4, 3), 100), ".png", (100, 100, 100)),
    (lambda: Image.new("1", (4, 3), 1), ".png", (255, 255, 255)),
    (lambda: Image.fromarray(np.full((3, 4), 128 * 257, np.uint16)), ".png", (128, 128, 128)),   # I;16
    (lambda: Image.fromarray(np.full((3, 4), 65535, np.int32), "I"), ".tif", (255, 255, 255)),
    (lambda: Image.fromarray(np.full((3, 4), 127.6, np.float32), "F"), ".tif", (128, 128, 128)),
    (lambda: Image.new("LA", (4, 3), (0, 255)), ".png", (0, 0, 0)),                  # opaque black
    (lambda: Image.new("LA", (4, 3), (0, 0)), ".png", (255, 255, 255)),              # transparent: white
    (lambda: Image.new("RGBA", (4, 3), (0, 0, 200, 128)), ".png", (127, 127, 227)),  # half over white
    (lambda: Image.new("RGB", (4, 3), (10, 20, 30)).convert("P", palette=Image.ADAPTIVE), ".png", (10, 20, 30)),
    (lambda: Image.new("CMYK", (4, 3), (255, 0, 0, 0)), ".jpg", (0, 255, 255)),       # cyan
])
def test_every_mode_reads_as_the_expected_rgb(tmp_path, make, suffix, expected):
    path = tmp_path / f"im{suffix}"
    make().save(path)
    got = pixel(path)
    assert all(abs(a - b) <= (3 if suffix == ".jpg" else 1) for a, b in zip(got, expected)), (got, expected)
    assert open_rgb(path).mode == "RGB"


def test_palette_with_a_transparent_index_is_white_there(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "p.png", transparency=1)
    assert pixel(tmp_path / "p.png", (0, 0)) == (255, 0, 0)
    assert pixel(tmp_path / "p.png", (1, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (3, 2), (0, 0, 0))
    im.putpixel((0, 0), (255, 0, 0))                                       # red top-left, stored
    exif = Image.Exif()
    exif[0x0112] = 6                                                       # displayed rotated 90 deg clockwise
    im.save(tmp_path / "r.png", exif=exif)
    out = open_rgb(tmp_path / "r.png")
    assert out.size == (2, 3)
    assert out.getpixel((1, 0)) == (255, 0, 0)                             # top-left went to top-right


def test_training_and_the_cli_read_a_16_bit_file_alike(tmp_path):
    """The bug this module fixed: `infgen upscale` read a 16-bit grey PNG as white, training as grey."""
    assert data.to_rgb is images.to_rgb and photo_cache.to_rgb is images.to_rgb
    Image.fromarray(np.full((16, 16), 127 * 257, np.uint16)).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        loader = np.asarray(images.to_rgb(im))
    assert loader.mean() == pytest.approx(127) and np.asarray(open_rgb(tmp_path / "g.png")).mean() == pytest.approx(127)


@pytest.mark.parametrize("content,message", [(None, "no such file"), (b"", "empty"), (b"not an image", "not a readable image"),
                                             ("truncated", "cannot decode")])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        open_rgb(path)
    assert "\n" not in str(e.value)


def test_decompression_bomb_guard_reads_only_the_header(tmp_path):
    Image.new("L", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"300x200 = 0 MP, above the input limit"):
        open_rgb(tmp_path / "big.png", max_pixels=50_000)
    assert open_rgb(tmp_path / "big.png", max_pixels=None).size == (300, 200)
    assert Image.MAX_IMAGE_PIXELS is not None                             # PIL's own guard is restored


def test_tensor_round_trip_and_atomic_save(tmp_path):
    x = torch.linspace(-1, 1, 3 * 5 * 7).reshape(3, 5, 7)
    im = tensor_to_pil(x)
    torch.testing.assert_close(pil_to_tensor(im)[0], x, rtol=0, atol=1 / 127.5)
    save_image(im, tmp_path / "sub" / "x.png")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.png"]      # no temp file left
    assert pixel(tmp_path / "sub" / "x.png") == im.getpixel((0, 0))
    with pytest.raises(ValueError, match="unknown image file type"):
        save_image(im, tmp_path / "x.nope")

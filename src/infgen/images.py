"""Image files in and out, in one place: training, evaluation, the CLI, the demo page and the pipeline all
read photos with `open_rgb` / `to_rgb`, convert with `pil_to_tensor` / `tensor_to_pil` and write with
`save_image`, so a file looks the same to every tool (16-bit grey, palettes, alpha, CMYK, EXIF rotation).
"""
from __future__ import annotations

import contextlib
import io
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from .checkpoint import atomic_write_bytes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Decompression-bomb guard for inputs (PIL's own default warns at 89 MP and fails at 179 MP).
MAX_INPUT_PIXELS = 100_000_000
_BOMB_LOCK = threading.Lock()  # open_rgb swaps PIL's global limit for the call (the demo page has threads)


def one_line(e: BaseException, limit: int = 300) -> str:
    """A third-party message squeezed onto one line (torch's weights_only errors span a screen)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode (1, L, P, LA, RGBA, CMYK, I;16, I, F, ...) -> RGB, EXIF orientation applied.

    16/32-bit grey is scaled to 8 bits (I;16 and I by 1/257 when any value exceeds 255, F as 0..255), never
    clipped to white; transparency is composited on white.
    """
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(a / (257.0 if a.max() > 255 else 1.0), 0, 255).round().astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def check_file(path: Path) -> None:
    """An input file that exists and is not empty, else a one-line ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes)")


@contextlib.contextmanager
def own_bomb_check():
    """PIL's bomb check runs inside Image.open with its own limit; ours (from the header) replaces it."""
    with _BOMB_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def open_rgb(path: str | Path, max_pixels: int | None = MAX_INPUT_PIXELS) -> Image.Image:
    """An image file -> a fully decoded RGB image (to_rgb). Every failure is a one-line ValueError naming
    the file: missing, empty, not an image, above max_pixels (checked from the header, before decoding), or
    truncated/corrupt data."""
    path = Path(path)
    check_file(path)
    with own_bomb_check():
        try:
            im = Image.open(path)
        except Exception as e:  # UnidentifiedImageError, SyntaxError, struct.error...: not an image
            raise ValueError(f"{path} is not a readable image ({one_line(e)})") from None
        with im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ValueError(f"{path} is {w}x{h} = {w * h / 1e6:.0f} MP, above the input limit of "
                                 f"{max_pixels / 1e6:.0f} MP (decompression-bomb guard); "
                                 "pass --max-input-pixels to raise it")
            try:
                im.load()                  # truncated / corrupt data fails here, not later
                return to_rgb(im)
            except Exception as e:
                raise ValueError(f"{path}: cannot decode the image data ({one_line(e)})") from None


def pil_to_tensor(image: Image.Image) -> Tensor:
    """PIL (any mode, via to_rgb) -> (1, 3, h, w) float32 in [-1, 1]."""
    arr = np.asarray(to_rgb(image), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(x: Tensor) -> Image.Image:
    """(3, h, w) in [-1, 1] -> RGB PIL image (rounded, not truncated)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def image_format(path: str | Path) -> str:
    """PIL's format name for a file name's suffix; a one-line ValueError for suffixes PIL cannot write."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"-o {path}: unknown image file type {Path(path).suffix or '(no suffix)'!r}; "
                         "use .png, .jpg, .webp, .tif or .bmp")
    return fmt


def save_image(image: Image.Image, path: str | Path) -> None:
    """Encode in memory, then write atomically and fsynced (checkpoint.atomic_write_bytes)."""
    path = Path(path)
    fmt = image_format(path)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())

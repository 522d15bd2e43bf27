"""`infgen serve`: a demo web page (gradio) that re-renders a photo at any size with InfGen.

    infgen serve                                   # http://127.0.0.1:7860, bundled weights
    infgen serve --checkpoint runs/bundle --host 0.0.0.0 --max-pixels 8294400 --timeout 60

Upload a photo (or click a bundled sample), pick 2x / 1080p / 4K / 8K or a custom size, press the button:
the page shows the result, how long the decode took, and a PNG to download. Every decode goes through
InfGenPipeline.upscale (the one decoding path the CLI, evaluation and benchmarks use).

Limits a public demo needs: an output pixel cap (--max-pixels, 8K by default), an input pixel cap and an
upload size cap (gradio's max_file_size), a per-request time limit (--timeout) and a queue that runs one
decode at a time. Uploads are read with our own PIL code (images.open_rgb), so empty, truncated,
non-image and decompression-bomb files get a one-line message in the page and the server keeps serving.
The page is fully offline: no analytics, no share link, no server-side rendering, fonts served locally.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import gradio as gr  # the optional extra `infgen[demo]`; cli.py turns an ImportError into a hint
from PIL import Image

from . import images
from .commands import common
from .model import check_size
from .pipeline import InfGenPipeline

SAMPLES_DIR = Path(__file__).parent / "assets" / "samples"
MAX_PIXELS_8K = 7680 * 4320
CUSTOM = "custom"
# label -> output box (width, height); None means 2x the input.
PRESETS: dict[str, tuple[int, int] | None] = {
    "2x": None,
    "1080p (1920x1080)": (1920, 1080),
    "4K (3840x2160)": (3840, 2160),
    "8K (7680x4320)": (7680, 4320),
}


@dataclass
class ServeLimits:
    """What one request may cost; checked before any decoding starts."""
    max_pixels: int | None = MAX_PIXELS_8K          # output width*height cap (None: no cap)
    max_input_pixels: int = images.MAX_INPUT_PIXELS  # decoded upload width*height cap (bomb guard)
    max_upload_mb: float = 20.0                     # upload size cap, enforced by gradio and re-checked here
    timeout_s: float = 120.0                        # wall-clock limit of one decode (encode + decode + PNG)
    queue_size: int = 16                            # requests waiting beyond this are turned away

    def __post_init__(self):
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 or None, got {self.max_pixels}")
        if self.max_input_pixels < 1:
            raise ValueError(f"max_input_pixels must be >= 1, got {self.max_input_pixels}")
        if not self.max_upload_mb > 0:
            raise ValueError(f"max_upload_mb must be > 0, got {self.max_upload_mb}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")


class RequestError(ValueError):
    """A problem with one request (bad upload, size too big, too slow): shown in the page, server keeps going."""


class DecodeTimeout(RequestError):
    pass


# -- arguments -----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeLimits()
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the page to your network)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--checkpoint", metavar="DIR", default=None,
                        help="a bundle directory (infgen/ + codec/ + bundle.json); default: the bundled weights")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to decode (default cpu)")
    common.add_dtype_argument(parser)
    parser.add_argument("--max-pixels", type=int, default=d.max_pixels, metavar="N",
                        help=f"refuse outputs above N pixels (default {d.max_pixels} = 8K; 0 lifts the cap)")
    parser.add_argument("--max-input-pixels", type=int, default=d.max_input_pixels, metavar="N",
                        help=f"refuse uploads above N pixels (decompression-bomb guard, default {d.max_input_pixels})")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb, metavar="N",
                        help=f"refuse uploads above N megabytes (default {d.max_upload_mb:g})")
    parser.add_argument("--timeout", type=float, default=d.timeout_s, metavar="S",
                        help=f"stop a decode that runs longer than S seconds (default {d.timeout_s:g})")
    parser.add_argument("--queue-size", type=int, default=d.queue_size, metavar="N",
                        help=f"requests allowed to wait for the single decode worker (default {d.queue_size})")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    limits = ServeLimits(max_pixels=common.max_pixels(args.max_pixels), max_input_pixels=args.max_input_pixels,
                         max_upload_mb=args.max_upload_mb, timeout_s=args.timeout, queue_size=args.queue_size)
    pipe, what = common.load_pipeline(args.checkpoint, common.pick_device(args.device), args.dtype)
    if pipe.codec is None:
        raise ValueError(f"the demo re-renders photos and needs an encoder, and {what} has none; pass a bundle "
                         "directory (infgen/ + codec/) as --checkpoint")
    outdir = Path(tempfile.mkdtemp(prefix="infgen-serve-"))
    demo = build_app(pipe, limits, outdir=outdir)
    if threading.current_thread() is threading.main_thread():  # `kill`/`docker stop`: close cleanly
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    print(f"infgen serve: {what}; outputs in {outdir}")
    try:
        launch(demo, args.host, args.port, limits, outdir)  # blocks; gradio closes the server on Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        shutil.rmtree(outdir, ignore_errors=True)
    return 0


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def launch(demo: gr.Blocks, host: str, port: int, limits: ServeLimits, outdir: Path, **kwargs):
    """Start the server (blocking unless prevent_thread_lock=True); returns gradio's (app, local_url, share_url)."""
    samples = [str(SAMPLES_DIR)] if SAMPLES_DIR.is_dir() else []
    return demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, mcp_server=False,
                       max_file_size=int(limits.max_upload_mb * 1024 * 1024), allowed_paths=samples + [str(outdir)],
                       show_error=True, inbrowser=False, footer_links=[], **kwargs)


# -- the work of one request ---------------------------------------------------------------------------------
def output_size(preset: str, in_w: int, in_h: int, width=None, height=None,
                keep_aspect: bool = True) -> tuple[int, int]:
    """(width, height) of the result for an input of in_w x in_h.

    2x doubles the input. A resolution preset is a box: with keep_aspect the result is the largest size of
    the input's aspect ratio that fits in it (turned upright for portrait inputs), otherwise exactly the box.
    CUSTOM uses width/height as typed."""
    if preset == CUSTOM:
        sizes = []
        for name, v in (("width", width), ("height", height)):
            if v is None or isinstance(v, bool) or float(v) != int(v) or int(v) < 1:
                raise RequestError(f"custom {name} must be a whole number >= 1, got {v!r}")
            sizes.append(int(v))
        return sizes[0], sizes[1]
    if preset not in PRESETS:
        raise RequestError(f"unknown size preset {preset!r}; expected one of {[*PRESETS, CUSTOM]}")
    box = PRESETS[preset]
    if box is None:
        return 2 * in_w, 2 * in_h
    bw, bh = box
    if not keep_aspect:
        return bw, bh
    if in_h > in_w:                                   # portrait photo: fit in the upright box
        bw, bh = bh, bw
    s = min(bw / in_w, bh / in_h)
    return min(max(round(in_w * s), 1), bw), min(max(round(in_h * s), 1), bh)


@contextlib.contextmanager
def deadline(modules, seconds: float):
    """Stop a running decode after `seconds`: a forward pre-hook on every submodule checks the clock.

    Torch cannot interrupt a thread, but a decode is thousands of module calls (tiles x blocks), so raising
    from a hook stops it within one layer call and frees the worker for the next request."""
    end = time.monotonic() + seconds

    def check(module, inputs):
        if time.monotonic() > end:
            raise DecodeTimeout(f"the decode ran longer than the {seconds:g} s limit and was stopped; "
                                "choose a smaller output size")

    handles = [m.register_forward_pre_hook(check) for root in modules for m in root.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Upscaler:
    """The page's two callbacks (preview an upload, upscale it) around one pipeline and its limits."""

    def __init__(self, pipe: InfGenPipeline, limits: ServeLimits, outdir: Path, keep_outputs_s: float = 3600):
        self.pipe, self.limits, self.outdir = pipe, limits, Path(outdir)
        self.keep_outputs_s = keep_outputs_s
        self.outdir.mkdir(parents=True, exist_ok=True)

    def read(self, path) -> Image.Image:
        """An uploaded file -> RGB image, or RequestError with a message that names the upload, not its temp path."""
        if path is None:
            raise RequestError("upload a photo or pick a sample first")
        path = Path(path)
        if path.is_file() and path.stat().st_size > self.limits.max_upload_mb * 1024 * 1024:
            raise RequestError(f"{path.name} is {path.stat().st_size / 2**20:.1f} MB, above the "
                               f"{self.limits.max_upload_mb:g} MB upload limit")
        try:
            return images.open_rgb(path, self.limits.max_input_pixels)
        except ValueError as e:
            raise RequestError(str(e).replace(str(path), path.name)) from None

    def preview(self, path):
        """Upload changed -> (thumbnail, status line); checks the file early, before the user asks for a size."""
        if path is None:
            return None, ""
        try:
            image = self.read(path)
        except RequestError as e:
            return None, f"Upload rejected: {e}"
        info = f"{Path(path).name}: {image.width}x{image.height} px"
        image.thumbnail((512, 512))
        return image, info

    def upscale(self, path, preset, width, height, keep_aspect):
        """Button pressed -> (result PNG path, status line, download button). Errors become the status line."""
        try:
            return self._upscale(path, preset, width, height, keep_aspect)
        except RequestError as e:
            return None, f"Error: {e}", gr.update(value=None, visible=False)

    def _upscale(self, path, preset, width, height, keep_aspect):
        image = self.read(path)
        W, H = output_size(preset, image.width, image.height, width, height, keep_aspect)
        try:
            check_size(H, W, self.limits.max_pixels)
        except ValueError:
            raise RequestError(f"{W}x{H} = {W * H / 1e6:.1f} MP is above this server's limit of "
                               f"{self.limits.max_pixels / 1e6:.1f} MP ({self.limits.max_pixels} pixels); "
                               "choose a smaller size") from None
        self._prune_outputs()
        t0 = time.perf_counter()
        with deadline([m for m in (self.pipe.model, self.pipe.codec) if m is not None], self.limits.timeout_s):
            result = self.pipe.upscale(image, H, W, max_pixels=self.limits.max_pixels)
        seconds = time.perf_counter() - t0
        out = self.outdir / f"infgen_{Path(path).stem[:40]}_{W}x{H}_{uuid.uuid4().hex[:8]}.png"
        t1 = time.perf_counter()
        result.save(out, format="PNG", compress_level=1)  # level 1: an 8K PNG in ~1 s instead of ~10 s
        status = (f"{image.width}x{image.height} -> {result.width}x{result.height} px "
                  f"({result.width * result.height / 1e6:.2f} MP) decoded in {seconds:.2f} s "
                  f"({common.megapixels_per_s(H, W, seconds):.3g} MP/s); PNG {out.stat().st_size / 2**20:.2f} MB "
                  f"written in {time.perf_counter() - t1:.2f} s")
        return str(out), status, gr.update(value=str(out), label=f"Download PNG ({W}x{H})", visible=True)

    def _prune_outputs(self):
        """Results are served from outdir; drop those older than keep_outputs_s so the disk does not fill."""
        cutoff = time.time() - self.keep_outputs_s
        for f in self.outdir.glob("*.png"):
            with contextlib.suppress(OSError):
                if f.stat().st_mtime < cutoff:
                    f.unlink()


# -- the page ------------------------------------------------------------------------------------------------
def build_app(pipe: InfGenPipeline, limits: ServeLimits | None = None, outdir: str | Path | None = None,
              samples_dir: str | Path | None = SAMPLES_DIR) -> gr.Blocks:
    """The gradio page around `pipe`. Launch it with `launch(...)` (it sets the upload cap and allowed paths)."""
    limits = limits or ServeLimits()
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # the demo never phones home (read again at launch)
    outdir = Path(outdir) if outdir is not None else Path(tempfile.mkdtemp(prefix="infgen-serve-"))
    worker = Upscaler(pipe, limits, outdir)
    samples = sorted(p for p in Path(samples_dir).glob("*") if p.suffix.lower() in images.IMAGE_SUFFIXES) \
        if samples_dir is not None and Path(samples_dir).is_dir() else []
    cap = "no cap" if limits.max_pixels is None else f"{limits.max_pixels / 1e6:.1f} MP"

    with gr.Blocks(title="InfGen: any-resolution decoding", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# InfGen\nRe-render a photo at any resolution: the frozen encoder turns it into a latent, "
                    "InfGen decodes that latent at the size you choose. "
                    f"Limits: output {cap}, upload {limits.max_upload_mb:g} MB, {limits.timeout_s:g} s per decode.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Photo (PNG, JPEG, WebP, ...)", file_count="single", type="filepath",
                                 elem_id="upload")
                preview = gr.Image(label="Input", interactive=False, height=256, elem_id="preview")
                if samples:
                    gr.Examples(examples=[[str(p)] for p in samples], inputs=[upload], label="Samples")
                preset = gr.Radio([*PRESETS, CUSTOM], value="2x", label="Output size", elem_id="preset")
                keep_aspect = gr.Checkbox(value=True, label="Keep the photo's aspect ratio (fit inside the preset)",
                                          elem_id="keep_aspect")
                with gr.Row(visible=False) as custom_row:
                    width = gr.Number(value=1920, precision=0, minimum=1, label="Width", elem_id="width")
                    height = gr.Number(value=1080, precision=0, minimum=1, label="Height", elem_id="height")
                button = gr.Button("Upscale", variant="primary", elem_id="run")
            with gr.Column():
                result = gr.Image(label="Result", type="filepath", format="png", interactive=False,
                                  elem_id="result")
                status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="status")
                download = gr.DownloadButton("Download PNG", visible=False, elem_id="download")

        preset.change(lambda p: gr.update(visible=p == CUSTOM), inputs=preset, outputs=custom_row,
                      queue=False, api_visibility="private")
        upload.change(worker.preview, inputs=upload, outputs=[preview, status], concurrency_limit=2,
                      concurrency_id="preview", api_visibility="private")
        button.click(worker.upscale, inputs=[upload, preset, width, height, keep_aspect],
                     outputs=[result, status, download], api_name="upscale")
    # One decode at a time: a decode already uses every core, and two would double peak memory.
    demo.queue(default_concurrency_limit=1, max_size=limits.queue_size)
    demo.infgen_worker = worker  # for tests and embedding
    return demo

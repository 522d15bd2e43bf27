"""`infgen serve`: a demo web page (gradio) that re-renders a photo at any size with InfGen.

    infgen serve                                   # http://127.0.0.1:7860, bundled weights
    infgen serve --checkpoint runs/bundle --host 0.0.0.0 --max-pixels 8294400 --timeout 60

Upload a photo (or click a bundled sample), pick 2x / 1080p / 4K / 8K or a custom size, press the button:
the page shows the result, how long the decode took, and a PNG to download. Every decode goes through
InfGenPipeline.upscale (the one decoding path the CLI, evaluation and benchmarks use).

Limits a public demo needs: an output pixel cap (--max-pixels, 8K by default), an input pixel cap and an
upload size cap (gradio's max_file_size), a per-request time limit (--timeout), and admission by cost:
before a request joins the line for the single decode worker, its cost is estimated from the upload's
header and the requested size (CostModel: input pixels read and encoded, every decode pass of the
extrapolation loop, the PNG) and it is refused, with a message that says what to change, when the estimate
is above --max-request-seconds (timeout/4 by default) or when the line (running + waiting) would hold more
than --queue-size waiting requests or --max-queue-seconds (= timeout) of estimated work. A refusal costs
the server a header read; the server log gets one line per refused, stopped or served request.
Uploads are read with our own PIL code (images.open_rgb), so empty, truncated, non-image and
decompression-bomb files get a one-line message in the page and the server keeps serving.
The page is fully offline: no analytics, no share link, no server-side rendering, fonts served locally.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import numbers
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr  # the optional extra `infgen[demo]`; cli.py turns an ImportError into a hint
from PIL import Image

from . import images
from .commands import common
from .pipeline import InfGenPipeline, cells_read, plan_passes

log = logging.getLogger("infgen.serve")
SAMPLES_DIR = Path(__file__).parent / "assets" / "samples"
FP32_COST = 1.75  # fp32 / bf16 time of `infgen bench --pipeline` on the calibration CPU (92.3/53.4, 25.9/14.4 s)
MAX_PIXELS_8K = 7680 * 4320
ARRIVALS = 256  # requests gradio holds before handing them to a callback (the upscale callback takes all at once)
CUSTOM = "custom"
# label -> output box (width, height); None means 2x the input.
PRESETS: dict[str, tuple[int, int] | None] = {
    "2x": None,
    "1080p (1920x1080)": (1920, 1080),
    "4K (3840x2160)": (3840, 2160),
    "8K (7680x4320)": (7680, 4320),
}


@dataclass(frozen=True)
class CostModel:
    """Seconds a request costs this server, from its pixel counts: what admission compares with the budgets.

    Per-pixel rates (microseconds of one core) of each stage of InfGenPipeline.upscale plus the PNG, for the
    bundled default model in bf16 on the 2-core x86 CPU this project is developed on: least-squares fits to
    the CPU time of every encode and decode pass of six requests (one torch thread; two runs, the machine
    shared with other work), the larger of the two fits, rounded; docs/demo.md has the table. `scale`
    multiplies everything: 1.75 for fp32 (set by `infgen serve`), below 1 for faster hardware (--cost-scale)."""
    read_us: float = 0.12     # per input pixel: PIL decode, RGB, float tensor
    encode_us: float = 1.25   # per pixel encoded: the input, then every intermediate image of the extrapolation
    decode_us: float = 1.0    # per output pixel of every decode pass (intermediate images included)
    context_us: float = 1.5   # per native pixel (64 per latent cell) of the latent every decode pass reads,
    #                           window margins included: the model's base decoder and latent attention
    png_us: float = 0.05      # per output pixel: the result PNG (compress_level 1)
    pass_s: float = 0.15      # fixed cost of each encode and each decode pass
    scale: float = 1.0

    def __post_init__(self):
        for name in ("read_us", "encode_us", "decode_us", "context_us", "png_us", "pass_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0):
                raise ValueError(f"CostModel.{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.scale, bool) or not (isinstance(self.scale, numbers.Real) and math.isfinite(self.scale)
                                                and self.scale > 0):
            raise ValueError(f"CostModel.scale (--cost-scale) must be a finite number > 0, got {self.scale!r}")


def decode_passes(pipe: InfGenPipeline, in_w: int, in_h: int, out_w: int, out_h: int):
    """What pipe.upscale does to an in_w x in_h photo for an out_w x out_h result, as sizes: a list of
    (latent (h, w), decoded (h, w)) per decode pass, and the (h, w) of every image it encodes."""
    passes = plan_passes(pipe.info, (math.ceil(in_h / 8), math.ceil(in_w / 8)), out_h, out_w, (in_h, in_w),
                         pipe.codec is not None)
    return [(p.latent, p.decoded) for p in passes], [(in_h, in_w)] + [p.size for p in passes[:-1]]


@dataclass(frozen=True)
class Estimate:
    """The predicted cost of re-rendering an in_w x in_h photo at out_w x out_h."""
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    passes: int        # decode passes: 1, or 1 + the extrapolation loop's re-encodes
    encoded_px: int    # the input plus every intermediate image
    decoded_px: int    # every decode pass's output, the final one included
    context_px: int    # 64 x the latent cells every decode pass reads (window margins included)
    seconds: float

    def describe(self) -> str:
        (iw, ih), (ow, oh) = self.in_size, self.out_size
        steps = f", {self.passes} decode passes" if self.passes > 1 else ""
        return (f"{iw}x{ih} -> {ow}x{oh} is estimated at {self.seconds:.1f} s on this server "
                f"({self.encoded_px / 1e6:.1f} MP encoded, {self.decoded_px / 1e6:.1f} MP decoded{steps})")


def estimate(pipe: InfGenPipeline, in_w: int, in_h: int, out_w: int, out_h: int, cost: CostModel) -> Estimate:
    """What pipe.upscale(in_w x in_h photo, out_h, out_w) plus the PNG will cost, by `cost`'s rates: the input
    read and encoded, every decode pass (its output and the latent it reads), every intermediate image
    re-encoded. Arithmetic on sizes only: cheap enough to run before a request joins the line."""
    passes, encodes = decode_passes(pipe, in_w, in_h, out_w, out_h)
    encoded = sum(h * w for h, w in encodes)
    decoded = sum(h * w for _, (h, w) in passes)
    context = 64 * sum(cells_read(pipe.info, *lat) for lat, _ in passes)
    us = (in_w * in_h * cost.read_us + encoded * cost.encode_us + decoded * cost.decode_us
          + context * cost.context_us + out_w * out_h * cost.png_us)
    seconds = cost.scale * (us / 1e6 + (len(passes) + len(encodes)) * cost.pass_s)
    return Estimate((in_w, in_h), (out_w, out_h), len(passes), encoded, decoded, context, seconds)


def largest_fit(w: int, h: int, fits) -> tuple[int, int] | None:
    """The largest size of w x h's shape (at most w x h) for which fits(width, height) holds; None if none does
    (fits must be monotone in the size, as estimates are)."""
    def size(f: float) -> tuple[int, int]:
        return max(round(w * f), 1), max(round(h * f), 1)
    lo, hi = 1 / max(w, h), 1.0
    if not fits(*size(lo)):
        return None
    if fits(w, h):
        return w, h
    for _ in range(40):  # fits(size(lo)), not fits(size(hi))
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(*size(mid)) else (lo, mid)
    return size(lo)


@dataclass
class ServeLimits:
    """What one request may cost; checked before any decoding starts."""
    max_pixels: int | None = MAX_PIXELS_8K          # output width*height cap (None: no cap)
    max_input_pixels: int = images.MAX_INPUT_PIXELS  # decoded upload width*height cap (bomb guard)
    max_upload_mb: float = 20.0                     # upload size cap, enforced by gradio and re-checked here
    timeout_s: float = 120.0                        # wall-clock limit of one decode (encode + decode + PNG)
    queue_size: int = 16                            # requests that may wait for the decode worker
    max_request_s: float | None = None              # estimated seconds one request may cost (None: timeout/4)
    max_queue_s: float | None = None                # estimated seconds running + waiting may hold (None: timeout)
    cost: CostModel = field(default_factory=CostModel)

    def __post_init__(self):
        if self.max_request_s is None:
            self.max_request_s = self.timeout_s / 4
        if self.max_queue_s is None:
            self.max_queue_s = max(self.timeout_s, self.max_request_s)
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 or None, got {self.max_pixels}")
        if self.max_input_pixels < 1:
            raise ValueError(f"max_input_pixels must be >= 1, got {self.max_input_pixels}")
        if not self.max_upload_mb > 0:
            raise ValueError(f"max_upload_mb must be > 0, got {self.max_upload_mb}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        if not self.max_request_s > 0:
            raise ValueError(f"max_request_s (--max-request-seconds) must be > 0 seconds, got {self.max_request_s}")
        if not self.max_queue_s >= self.max_request_s:
            raise ValueError(f"max_queue_s (--max-queue-seconds) must be >= the per-request limit "
                             f"({self.max_request_s:g} s), got {self.max_queue_s}")


class RequestError(ValueError):
    """A problem with one request (bad upload, size too big, too slow): shown in the page, server keeps going."""


class DecodeTimeout(RequestError):
    pass


class Busy(RequestError):
    """The decode line is full (by count or by estimated work): try again later."""


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
    parser.add_argument("--max-request-seconds", type=float, default=None, metavar="S",
                        help="refuse a request whose estimated cost is above S seconds (default: --timeout / 4)")
    parser.add_argument("--max-queue-seconds", type=float, default=None, metavar="S",
                        help="refuse a request when the running and waiting requests' estimated cost would "
                             "exceed S seconds (default: --timeout)")
    parser.add_argument("--cost-scale", type=float, default=1.0, metavar="F",
                        help="multiply the cost model (calibrated on a 2-core CPU, bundled model, bf16) by F: "
                             "below 1 on faster hardware; fp32 multiplies it by 1.75 on its own (default 1)")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    device = common.pick_device(args.device)
    fp32 = common.resolve_dtype(args.dtype, device) == "fp32"
    cost = CostModel(scale=args.cost_scale * (FP32_COST if fp32 else 1.0))
    limits = ServeLimits(max_pixels=common.max_pixels(args.max_pixels), max_input_pixels=args.max_input_pixels,
                         max_upload_mb=args.max_upload_mb, timeout_s=args.timeout, queue_size=args.queue_size,
                         max_request_s=args.max_request_seconds, max_queue_s=args.max_queue_seconds, cost=cost)
    pipe, what = common.load_pipeline(args.checkpoint, device, args.dtype)
    if pipe.codec is None:
        raise ValueError(f"the demo re-renders photos and needs an encoder, and {what} has none; pass a bundle "
                         "directory (infgen/ + codec/) as --checkpoint")
    if not log.handlers:  # one line per request on stderr, next to gradio's own
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s infgen serve: %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    outdir = Path(tempfile.mkdtemp(prefix="infgen-serve-"))
    demo = build_app(pipe, limits, outdir=outdir)
    if threading.current_thread() is threading.main_thread():  # `kill`/`docker stop`: close cleanly
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    print(f"infgen serve: {what}; outputs in {outdir}; a request may cost {limits.max_request_s:g} s "
          f"(estimated), the line {limits.max_queue_s:g} s and {limits.queue_size} waiting", flush=True)
    try:
        launch(demo, args.host, args.port, limits, outdir)  # blocks; gradio closes the server on Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        demo.infgen_worker.line.close()
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
                       show_error=True, inbrowser=False, footer_links=[],
                       max_threads=max(40, limits.queue_size + 24), **kwargs)  # waiting requests hold a thread


# -- the decode line ---------------------------------------------------------------------------------------
class DecodeLine:
    """The single decode worker and the requests waiting for it, first come first served.

    `turn(seconds)` admits a request only while the line (running + waiting) stays within max_waiting
    waiting requests and max_seconds of estimated work, else raises Busy at once; an admitted request
    waits for its turn, runs, and leaves the line in `finally`, so a failed or stopped decode frees it too."""

    def __init__(self, max_waiting: int, max_seconds: float):
        self.max_waiting, self.max_seconds = max_waiting, max_seconds
        self.closed = threading.Event()                # set by close(): the server is stopping
        self._cond = threading.Condition()
        self._line: list[tuple[object, float]] = []   # (token, estimated seconds); the head is running

    def close(self) -> None:
        """The server is stopping: waiting requests leave with a message (their threads would otherwise keep
        the process alive, decoding for nobody) and `deadline` stops the running decode."""
        with self._cond:
            self.closed.set()
            self._cond.notify_all()

    def load(self) -> tuple[int, float]:
        """(requests in the line, their estimated seconds)."""
        with self._cond:
            return len(self._line), sum(s for _, s in self._line)

    @contextlib.contextmanager
    def turn(self, seconds: float, waiting=None):
        """Join the line with a request estimated at `seconds`, wait for its turn; `waiting(ahead, seconds)` is
        called while it waits, whenever the line ahead of it changes."""
        me = (object(), seconds)
        with self._cond:
            ahead, work = len(self._line), sum(s for _, s in self._line)
            if self.closed.is_set():
                raise Busy("the server is shutting down; try again later")
            if ahead > self.max_waiting:
                raise Busy(f"the server is busy: one request is decoding and {ahead - 1} are waiting, the most "
                           f"it lets wait ({self.max_waiting}); try again in a minute")
            if ahead and work + seconds > self.max_seconds:
                raise Busy(f"the server is busy: the {ahead} requests in line are estimated at {work:.0f} s and "
                           f"this one at {seconds:.1f} s, above the {self.max_seconds:g} s the line may hold; try "
                           "again in a minute or choose a smaller size")
            self._line.append(me)
            try:
                shown = None
                while self._line[0] is not me:
                    if self.closed.is_set():
                        raise Busy("the server is shutting down; try again later")
                    i = self._line.index(me)
                    now = (i, sum(s for _, s in self._line[:i]))
                    if waiting is not None and now != shown:
                        waiting(*now)
                        shown = now
                    self._cond.wait()
            except BaseException:
                self._line.remove(me)
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._line.remove(me)
                self._cond.notify_all()


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
            # the page's number boxes pass any value through (see build_app): check it here, as a message
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v != int(v) or v < 1:
                raise RequestError(f"custom {name} must be a whole number >= 1, got {v!r}")
            sizes.append(int(v))
        return sizes[0], sizes[1]
    if not isinstance(preset, str) or preset not in PRESETS:
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
def deadline(modules, seconds: float, stop: threading.Event | None = None):
    """Stop a running decode after `seconds`, or once `stop` is set: a forward pre-hook on every submodule
    checks the clock.

    Torch cannot interrupt a thread, but a decode is thousands of module calls (tiles x blocks), so raising
    from a hook stops it within one layer call and frees the worker for the next request."""
    end = time.monotonic() + seconds

    def check(module, inputs):
        if time.monotonic() > end:
            raise DecodeTimeout(f"the decode ran longer than the {seconds:g} s limit and was stopped; "
                                "choose a smaller output size")
        if stop is not None and stop.is_set():
            raise DecodeTimeout("the server is shutting down; try again later")

    handles = [m.register_forward_pre_hook(check) for root in modules for m in root.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Upscaler:
    """The page's two callbacks (preview an upload, upscale it) around one pipeline, its limits and the line."""

    def __init__(self, pipe: InfGenPipeline, limits: ServeLimits, outdir: Path, keep_outputs_s: float = 3600):
        self.pipe, self.limits, self.outdir = pipe, limits, Path(outdir)
        self.keep_outputs_s = keep_outputs_s
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.line = DecodeLine(limits.queue_size, limits.max_queue_s)

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

    def probe(self, path) -> tuple[int, int]:
        """An upload's (width, height) from its header, without decoding the pixels: all an estimate needs.

        A file that cannot be probed, or is above the input pixel cap, goes to read() for its message: read's
        checks (size, emptiness, format, pixel cap) all fail before any pixel is decoded."""
        size = None
        if path is not None and Path(path).is_file() \
                and Path(path).stat().st_size <= self.limits.max_upload_mb * 1024 * 1024:
            try:
                with images.own_bomb_check(), Image.open(path) as im:  # our pixel cap, not PIL's
                    size = im.size
            except Exception:  # not an image, empty, ...: read() names the problem
                pass
        if size is None or size[0] * size[1] > self.limits.max_input_pixels:
            size = self.read(path).size  # raises (only a file that changed under us gets here and decodes)
        return size

    def check_input(self, in_w: int, in_h: int, name: str) -> None:
        """RequestError when the photo alone (read, encode, one decoder pass over its latent, at any output
        size) is over the per-request budget: then only a smaller photo helps."""
        budget, cost = self.limits.max_request_s, self.limits.cost

        def fits(w, h):
            return estimate(self.pipe, w, h, 1, 1, cost).seconds <= budget
        if fits(in_w, in_h):
            return
        alone = estimate(self.pipe, in_w, in_h, 1, 1, cost).seconds
        fit = largest_fit(in_w, in_h, fits)
        hint = f"at most about {fit[0]}x{fit[1]} = {fit[0] * fit[1] / 1e6:.1f} MP" if fit else "even 1x1 is over it"
        raise RequestError(f"{name} is {in_w}x{in_h} = {in_w * in_h / 1e6:.1f} MP: reading, encoding and decoding "
                           f"it at any size is estimated at {alone:.0f} s or more, above this server's {budget:g} s "
                           f"limit per request; use a smaller photo ({hint})")

    def admit(self, in_w: int, in_h: int, out_w: int, out_h: int, name: str) -> Estimate:
        """The request's estimate, or RequestError (what to change) when it is over the per-request budget."""
        if self.limits.max_pixels is not None and out_w * out_h > self.limits.max_pixels:
            raise RequestError(f"{out_w}x{out_h} = {out_w * out_h / 1e6:.1f} MP is above this server's limit of "
                               f"{self.limits.max_pixels / 1e6:.1f} MP ({self.limits.max_pixels} pixels); "
                               "choose a smaller size")
        self.check_input(in_w, in_h, name)
        est = estimate(self.pipe, in_w, in_h, out_w, out_h, self.limits.cost)
        if est.seconds > self.limits.max_request_s:
            fit = largest_fit(out_w, out_h, lambda w, h: estimate(self.pipe, in_w, in_h, w, h, self.limits.cost)
                              .seconds <= self.limits.max_request_s)  # not None: check_input passed
            raise RequestError(f"{est.describe()}, above this server's {self.limits.max_request_s:g} s limit per "
                               f"request; choose a smaller size (at most about {fit[0]}x{fit[1]} for this photo)")
        return est

    def preview(self, path):
        """Upload changed -> (thumbnail, status line); checks the file early, before the user asks for a size."""
        if path is None:
            return None, ""
        try:
            w, h = self.probe(path)
            self.check_input(w, h, Path(path).name)  # too big to serve: do not decode it for a thumbnail either
            image = self.read(path)
        except RequestError as e:
            return None, f"Upload rejected: {e}"
        info = f"{Path(path).name}: {image.width}x{image.height} px"
        image.thumbnail((512, 512))
        return image, info

    def upscale(self, path, preset, width, height, keep_aspect, progress=gr.Progress(), request: gr.Request = None):
        """Button pressed -> (result PNG path, status line, download button). Errors become the status line and
        one line in the server log (so does every served request)."""
        t0 = time.perf_counter()
        name = Path(path).name if isinstance(path, (str, os.PathLike)) else "(no upload)"
        who = getattr(getattr(request, "client", None), "host", None)
        name += f" from {who}" if who else ""
        try:
            out, status, size = self._upscale(path, preset, width, height, keep_aspect, progress)
        except RequestError as e:
            message = " ".join(str(e).split())
            log.info("%s %s after %.2f s: %s", "stopped" if isinstance(e, DecodeTimeout) else "refused", name,
                     time.perf_counter() - t0, message)
            return None, f"Error: {message}", gr.update(value=None, visible=False)
        log.info("served %s in %.2f s: %s", name, time.perf_counter() - t0, status)
        return str(out), status, gr.update(value=str(out), label=f"Download PNG ({size[0]}x{size[1]})", visible=True)

    def _upscale(self, path, preset, width, height, keep_aspect, progress):
        in_w, in_h = self.probe(path)
        W, H = output_size(preset, in_w, in_h, width, height, keep_aspect)
        est = self.admit(in_w, in_h, W, H, Path(path).name)

        def waiting(ahead: int, seconds: float):
            progress(0, desc=f"waiting for the decoder: {ahead} request{'s' * (ahead > 1)} ahead (~{seconds:.0f} s)")

        t_line = time.perf_counter()
        with self.line.turn(est.seconds, waiting):
            waited = time.perf_counter() - t_line
            image = self.read(path)
            if image.size != (in_w, in_h):  # EXIF rotation turned the photo: price it again as it is
                W, H = output_size(preset, image.width, image.height, width, height, keep_aspect)
                est = self.admit(image.width, image.height, W, H, Path(path).name)
            self._prune_outputs()
            t0 = time.perf_counter()
            with deadline([m for m in (self.pipe.model, self.pipe.codec) if m is not None], self.limits.timeout_s,
                          self.line.closed):
                result = self.pipe.upscale(image, H, W, max_pixels=self.limits.max_pixels)
            seconds = time.perf_counter() - t0
            out = self.outdir / f"infgen_{Path(path).stem[:40]}_{W}x{H}_{uuid.uuid4().hex[:8]}.png"
            t1 = time.perf_counter()
            result.save(out, format="PNG", compress_level=1)  # level 1: an 8K PNG in ~1 s instead of ~10 s
        status = (f"{image.width}x{image.height} -> {result.width}x{result.height} px "
                  f"({result.width * result.height / 1e6:.2f} MP) decoded in {seconds:.2f} s "
                  f"({common.megapixels_per_s(H, W, seconds):.3g} MP/s); PNG {out.stat().st_size / 2**20:.2f} MB "
                  f"written in {time.perf_counter() - t1:.2f} s; estimated {est.seconds:.1f} s, "
                  f"waited {waited:.1f} s in line")
        return out, status, (W, H)

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
                    f"Limits: output {cap}, upload {limits.max_upload_mb:g} MB, {limits.max_request_s:g} s "
                    "(estimated) per request; a request over it is refused at once with what to change.")
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
                    # no precision/minimum: gradio would refuse 0, -5 or "abc" itself, with a traceback in the
                    # server log; output_size checks the value and answers with a message instead
                    width = gr.Number(value=1920, step=1, label="Width", elem_id="width")
                    height = gr.Number(value=1080, step=1, label="Height", elem_id="height")
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
        # No concurrency limit here: every request reaches worker.upscale at once, which prices it and either
        # refuses it or puts it in worker.line, the one queue that runs one decode at a time (a decode already
        # uses every core, and two would double peak memory), bounded by count and by estimated seconds.
        button.click(worker.upscale, inputs=[upload, preset, width, height, keep_aspect],
                     outputs=[result, status, download], api_name="upscale", concurrency_limit=None)
    # gradio's own queue only holds arrivals until they are dispatched (previews: two at a time)
    demo.queue(default_concurrency_limit=1, max_size=ARRIVALS)
    demo.infgen_worker = worker  # for tests and embedding
    return demo

"""`infgen bench`: decode time, peak memory and FLOP/s of InfGen against the decoders it replaces.

One run measures everything into one results dict (this module), and bench_report.py writes everything
from it, so the numbers in the docs are always the output of a single run:
    <out>/bench.json   raw timings, FLOPs, memory, machine description, fits, targets
    <out>/bench.png    log-log time and peak memory vs megapixels, per model
    <doc>              the section between the `infgen-bench` markers of docs/benchmarks.md (the method
                       text around it is kept)

Cases: InfGen presets decode a 4x64x64 latent through the one decode path, `InfGen.decode(z, H, W)`; the
baselines are the SD-VAE decoder architecture (diffusers AutoencoderKL, SD config, random weights) decoding
the NATIVE latent of each size (H/8 x W/8), and a codec decode of the 64x64 latent (512^2) + bicubic resize.
Speed does not depend on weights, so random weights are fine; `small` uses the bundled weights when present.

Time: median of --repeats decodes after one warm-up. FLOPs: FlopCounterMode over the warm-up decode of each
case (exact for that case, tiling halo included), split into the transformer part (model.context +
model.tokens) and the conv decoder by wrapping those calls on the instance. Peak memory: a fresh subprocess
per case (`python -m infgen.bench --memory-worker SPEC`), RSS high-water mark (VmHWM after resetting it via
/proc/self/clear_refs; getrusage where that is unavailable) minus the RSS after model load and warm-up; on
CUDA torch.cuda.max_memory_allocated. Cases whose predicted time exceeds --max-seconds are skipped and
recorded as skipped with the prediction, never silently.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from . import bench_report
from .bench_report import LATENT, fits, ratios, targets
from .config import PRESETS, InfGenConfig
from .model import InfGen
from .utils import DTYPES

QUICK_LATENT = 16                # --quick: the 64x64 latent's self-attention would dominate a tiny model's time
DEFAULT_SIZES = "512x512,768x768,1024x1024,1920x1080,2048x2048,4096x1024,3840x2160,4096x4096,7680x4320"
QUICK_SIZES = "128x128,256x192"
write_doc = bench_report.write_doc  # bench_pipeline.py writes its own section with it

# The SD-VAE (SD 1.x / 2.x) decoder architecture; the tiny variant keeps the f8 shape for --quick.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                     layers_per_block=2, latent_channels=4, norm_num_groups=32, act_fn="silu", sample_size=512)
SD_VAE_TINY = {**SD_VAE_CONFIG, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


# FlopCounterMode has no formula for the CPU attention kernel (and sees the composite op under
# inference_mode): without these, global attention, base's biggest cost, would count as zero.
SDPA_FLOPS = {torch.ops.aten.scaled_dot_product_attention: _sdpa_flops,
              torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


# -- arguments -----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default=None, help="InfGen presets to time (default small,base; --quick: tiny)")
    parser.add_argument("--sizes", default=None, metavar="WxH,...",
                        help=f"output sizes (default {DEFAULT_SIZES}; --quick: {QUICK_SIZES})")
    parser.add_argument("--baselines", default="sd-vae,codec",
                        help="sd-vae (AutoencoderKL, SD config, native latent), codec (64x64 latent decode + "
                             "bicubic resize), or none (default sd-vae,codec)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case, after a warm-up (default 3)")
    parser.add_argument("--max-seconds", type=float, default=120.0, metavar="S",
                        help="skip (and record) cases whose predicted time per decode exceeds S (default 120); "
                             "cases a target needs always run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--compile", action="store_true", help="torch.compile InfGen's blocks and decoder levels "
                        "and the baselines' decoders (compilation happens outside the timed runs)")
    parser.add_argument("--latent", type=int, default=None, metavar="N",
                        help=f"side of the latent InfGen and the codec decode (default {LATENT}; --quick {QUICK_LATENT})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--memory", default=None, choices=["isolated", "inprocess", "off"],
                        help="peak memory: a fresh subprocess per case (default), the bench process (--quick), or off")
    parser.add_argument("--profile", default=None, metavar="WxH",
                        help="also profile one decode per InfGen preset at this size (torch.profiler)")
    parser.add_argument("--quick", action="store_true", help="harness check for CI: tiny preset and sizes, 1 repeat, "
                        "tiny baselines, in-process memory, output to a temporary directory")
    parser.add_argument("--out", default=None, help="output directory (default benchmarks/results; --quick: a temp dir)")
    parser.add_argument("--doc", default=None, help="markdown to write the results section into "
                        "(default docs/benchmarks.md; --quick: <out>/benchmarks.md)")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="bundle (infgen/ + codec/) or InfGen checkpoint timed as `small` and whose codec is the "
                             "codec baseline (default: the bundled weights when present, else random weights)")
    parser.add_argument("--pipeline", action="store_true",
                        help="time the user path instead (InfGenPipeline.upscale of a small photo: encode, "
                             "extrapolation, window and final decodes) at --sizes (default 1080p, 4K, 8K), fp32 "
                             "and the automatic dtype; writes OUT/pipeline.json and its section of --doc")
    parser.add_argument("--sample", default=None, metavar="IMAGE", help="--pipeline: the photo (default: the "
                        "demo's dragonfly)")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)


def _options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the --quick defaults and validate; user errors are ValueErrors naming the value."""
    from .commands.common import parse_sizes, pick_device

    o = argparse.Namespace(**vars(args))
    o.presets = [p.strip() for p in (args.presets or ("tiny" if args.quick else "small,base")).split(",") if p.strip()]
    for p in o.presets:
        if p not in PRESETS:
            raise ValueError(f"--presets: unknown preset {p!r}; expected some of {sorted(PRESETS)}")
    o.sizes = sorted(set(parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))),
                     key=lambda s: (s[0] * s[1], s))
    names = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if names == ["none"]:
        names = []
    for b in names:
        if b not in ("sd-vae", "codec"):
            raise ValueError(f"--baselines: unknown baseline {b!r}; expected sd-vae, codec or none")
    o.baselines = names
    o.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if o.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {o.repeats}")
    if not args.max_seconds > 0:
        raise ValueError(f"--max-seconds must be > 0, got {args.max_seconds}")
    o.latent = args.latent or (QUICK_LATENT if args.quick else LATENT)
    if o.latent < 1:
        raise ValueError(f"--latent must be >= 1, got {o.latent}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    o.profile = parse_sizes(args.profile)[0] if args.profile else None
    o.device = pick_device(args.device)
    o.torch_dtype = DTYPES[args.dtype]
    o.memory = args.memory or ("inprocess" if args.quick or o.device.type == "cuda" else "isolated")
    o.out = Path(args.out) if args.out else (None if args.quick else Path("benchmarks/results"))  # None: a temp dir
    o.doc = Path(args.doc) if args.doc else (None if args.quick else Path("docs/benchmarks.md"))  # None: OUT/benchmarks.md
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        raise ValueError(f"--checkpoint {args.checkpoint}: not a directory")
    return o


# -- the models being timed ----------------------------------------------------------------------------------
def _sync_fn(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


class PhaseTimer:
    """Times (and, under a FlopCounterMode, counts the FLOPs of) the parts of a real `InfGen.decode` call by
    wrapping model.context / model.tokens (the transformer) and model.decoder.forward (the conv decoder) on the
    instance for the duration of `record()`. On CUDA each wrapped call is bracketed by synchronize()."""

    PARTS = ("context", "tokens", "decoder")

    def __init__(self, model: InfGen | None, sync: Callable[[], None]):
        self.model, self.sync = model, sync

    @contextlib.contextmanager
    def record(self, counter: FlopCounterMode | None = None):
        rec = {"seconds": defaultdict(float), "flops": defaultdict(int)}
        if self.model is None:
            yield rec
            return
        m = self.model
        targets = [(m, "context", "context"), (m, "tokens", "tokens"), (m.decoder, "forward", "decoder")]

        def wrap(fn, part):
            def timed(*a, **k):
                self.sync()
                f0, t0 = counter.get_total_flops() if counter else 0, time.perf_counter()
                with torch.profiler.record_function(f"infgen.{part}"):
                    out = fn(*a, **k)
                self.sync()
                rec["seconds"][part] += time.perf_counter() - t0
                rec["flops"][part] += (counter.get_total_flops() - f0) if counter else 0
                return out
            return timed

        for obj, attr, part in targets:  # instance attributes shadow the methods
            object.__setattr__(obj, attr, wrap(getattr(obj, attr), part))
        try:
            yield rec
        finally:
            for obj, attr, _ in targets:
                object.__delattr__(obj, attr)


class Subject:
    """One model being timed: `prepare(H, W)` returns a zero-argument decode to an (B, 3, H, W) tensor."""
    name: str
    kind: str
    required: set = set()         # sizes a target needs: run even above --max-seconds
    phases: PhaseTimer
    predict_method = "FLOPs of the largest measured size scaled by 8x8 output cells"

    def prepare(self, height: int, width: int) -> Callable[[], Tensor]:
        raise NotImplementedError

    def predict_flops(self, height: int, width: int, last: dict) -> int | None:
        """FLOPs of a case from the largest measured one (`last`), for the --max-seconds skip."""
        scale = _cells(height, width) / _cells(last["height"], last["width"])
        return int(last["flops"] * scale)

    def info(self) -> dict:
        return {}


def _cells(height: int, width: int) -> int:
    return math.ceil(height / 8) * math.ceil(width / 8)


def _latent(channels: int, h: int, w: int, device, dtype) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, channels, h, w, generator=g).to(device, dtype)


def _compile_modules(modules) -> None:
    for module in modules:
        module.compile()  # in place; shapes that change between tiles/sizes recompile once, then go dynamic


class InfGenSubject(Subject):
    kind = "infgen"
    predict_method = "context FLOPs (fixed) + the rest of the largest measured size scaled by 8x8 output cells"

    def __init__(self, spec: dict, device, dtype, compile_: bool):
        self.name, self.spec = spec["name"], spec
        torch.manual_seed(0)
        if spec.get("weights"):
            self.model = InfGen.from_pretrained(spec["weights"])
            self.source = spec["weights"]
        else:
            self.model = InfGen(InfGenConfig.preset(spec["preset"]))
            self.source = "random weights"
        self.model = self.model.to(device, dtype).eval()
        if compile_:
            _compile_modules([*self.model.latent_blocks, *self.model.blocks, *self.model.decoder.levels])
        n = spec["latent"]
        self.latent = _latent(self.model.config.latent_channels, n, n, device, dtype)
        self.phases = PhaseTimer(self.model, _sync_fn(torch.device(device)))
        # The sizes the targets read (4K time, 1080p vs 8K memory, base vs SD-VAE at 768^2) always run.
        self.required = {"small": {(1080, 1920), (2160, 3840), (4320, 7680)}, "base": {(768, 768)}}.get(self.name, set())

    def prepare(self, height, width):
        return lambda: self.model.decode(self.latent, height, width)

    def predict_flops(self, height, width, last):
        # The context (latent self-attention + K/V) is a fixed cost; everything else is per 8x8 output cell.
        fixed = last["flops_parts"].get("context", 0)
        return int(fixed + (last["flops"] - fixed) * _cells(height, width) / _cells(last["height"], last["width"]))

    def info(self):
        return dict(source=self.source, parameters=self.model.num_parameters(), config=self.model.config.to_dict(),
                    latent=list(self.latent.shape[1:]))


class SDVAESubject(Subject):
    """diffusers AutoencoderKL with the SD config, random weights, decoding the native H/8 x W/8 latent."""
    kind = "sd-vae"
    predict_method = "exact FLOPs of the same architecture on the meta device"

    def __init__(self, spec: dict, device, dtype, compile_: bool):
        from diffusers import AutoencoderKL

        self.name, self.spec = spec["name"], spec
        self.config = SD_VAE_TINY if spec.get("tiny") else SD_VAE_CONFIG
        torch.manual_seed(0)
        # channels_last, as InfGen's convolutions run: a fair baseline. In NCHW (diffusers' default) its bf16
        # decode at 768^2 took 14.9 s on this project's CPU against 6.0 s in channels_last.
        self.vae = AutoencoderKL(**self.config).to(device, memory_format=torch.channels_last).eval()
        if dtype != torch.float32:
            self.vae = self.vae.to(dtype)
        if compile_:
            _compile_modules([self.vae.decoder])
        self.device, self.dtype = device, dtype
        self.phases = PhaseTimer(None, _sync_fn(torch.device(device)))
        self.required = {(512, 512), (768, 768)}
        self._meta = None

    def prepare(self, height, width):
        h, w = math.ceil(height / 8), math.ceil(width / 8)
        z = _latent(4, h, w, self.device, self.dtype).contiguous(memory_format=torch.channels_last)

        @torch.inference_mode()
        def run():
            return self.vae.decode(z).sample[:, :, :height, :width]
        return run

    def predict_flops(self, height, width, last):
        # Exact: the same architecture on the meta device (shapes only, no compute). Attention in the mid
        # block is quadratic in the latent, so scaling by pixels would underestimate large sizes.
        from diffusers import AutoencoderKL

        if self._meta is None:
            with torch.device("meta"):
                self._meta = AutoencoderKL(**self.config).eval()
        z = torch.empty(1, 4, math.ceil(height / 8), math.ceil(width / 8), device="meta")
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter:
            self._meta.decode(z)
        return counter.get_total_flops()

    def info(self):
        return dict(source="random weights", parameters=sum(p.numel() for p in self.vae.decoder.parameters()) +
                    sum(p.numel() for p in self.vae.post_quant_conv.parameters()), config=self.config,
                    latent="native: 4 x H/8 x W/8")


class CodecSubject(Subject):
    """The bundle's autoencoder decodes the n x n latent at its native 8n x 8n, then a bicubic resize."""
    kind = "codec"

    def __init__(self, spec: dict, device, dtype, compile_: bool):
        from .autoencoder import AutoencoderConfig, KLAutoencoder

        self.name, self.spec = spec["name"], spec
        torch.manual_seed(0)
        if spec.get("weights"):
            self.ae, self.source = KLAutoencoder.from_pretrained(spec["weights"]), spec["weights"]
        else:
            self.ae, self.source = KLAutoencoder(AutoencoderConfig.preset(spec["preset"])), "random weights"
        self.ae = self.ae.to(device, dtype).eval()
        if compile_:
            _compile_modules([self.ae.decoder])
        n = spec["latent"]
        self.latent = _latent(self.ae.latent_channels, n, n, device, dtype)
        self.phases = PhaseTimer(None, _sync_fn(torch.device(device)))

    def prepare(self, height, width):
        @torch.inference_mode()
        def run():
            img = self.ae.decode(self.latent)                                       # (1, 3, 8n, 8n)
            return F.interpolate(img, size=(height, width), mode="bicubic", align_corners=False).clamp_(-1, 1)
        return run

    def info(self):
        return dict(source=self.source, parameters=sum(p.numel() for p in self.ae.decoder.parameters()),
                    config=self.ae.config.to_dict(), latent=list(self.latent.shape[1:]))


SUBJECTS = {"infgen": InfGenSubject, "sd-vae": SDVAESubject, "codec": CodecSubject}


def _specs(o: argparse.Namespace) -> list[dict]:
    """JSON-able descriptions of the models, so a memory worker can rebuild the same one."""
    from . import pipeline

    bundle = Path(o.checkpoint) if o.checkpoint else (pipeline.DEFAULT_BUNDLE if not o.quick else None)
    infgen_dir = codec_dir = None
    if bundle is not None and bundle.is_dir():
        infgen_dir = bundle / "infgen" if (bundle / "infgen").is_dir() else bundle
        codec_dir = bundle / "codec" if (bundle / "codec" / "config.json").is_file() else None
    specs = []
    for p in o.presets:
        weights = str(infgen_dir) if p == "small" and infgen_dir is not None else None
        if weights:
            cfg = json.loads((Path(weights) / "config.json").read_text())
            cfg.pop("_class_name", None)
            # The latent space's scale/shift do not change the cost; the architecture must be `small`'s.
            latent_space = {k: cfg[k] for k in ("scaling_factor", "shift_factor") if k in cfg}
            if InfGenConfig.from_dict(cfg) != InfGenConfig.preset("small", **latent_space):
                if o.checkpoint:
                    raise ValueError(f"--checkpoint {weights}: its config is not the `small` preset; bench times "
                                     "presets (time a bundle's own path with --pipeline)")
                # The bundled default is `small` plus a base decoder and 16-channel latents since 2026-11-30:
                # time the preset (speed does not depend on the weights); --pipeline times the bundle.
                print(f"infgen bench: the bundled InfGen ({weights}) is not the `small` preset; timing `small` "
                      "with random weights (the bundle's own path: infgen bench --pipeline)", file=sys.stderr)
                weights = None
        specs.append(dict(name=p, kind="infgen", preset=p, weights=weights, latent=o.latent))
    if "sd-vae" in o.baselines:
        if importlib.util.find_spec("diffusers") is None:  # fail before any case runs, not after the first
            raise ImportError("the sd-vae baseline needs diffusers: pip install 'infgen[diffusers]', "
                              "or leave it out with --baselines codec")
        specs.append(dict(name="sd-vae", kind="sd-vae", tiny=o.quick))
    if "codec" in o.baselines:
        is_kl = codec_dir is not None and json.loads((codec_dir / "config.json").read_text()).get("_class_name") == "KLAutoencoder"
        specs.append(dict(name="codec+bicubic", kind="codec", preset="tiny" if o.quick else "small",
                          weights=str(codec_dir) if is_kl else None, latent=o.latent))
    return specs


# -- measurements --------------------------------------------------------------------------------------------
def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> dict:
    """Median FLOP/s of an n^3 matmul: the machine's practical peak for this dtype."""
    sync = _sync_fn(device)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return dict(n=n, seconds_all=times, flops_per_s=2 * n ** 3 / statistics.median(times))


def time_case(subject: Subject, height: int, width: int, o: argparse.Namespace) -> dict:
    """One warm-up decode under FlopCounterMode (eager, also under --compile), then o.repeats timed decodes."""
    sync = _sync_fn(o.device)
    run = subject.prepare(height, width)
    eager = torch.compiler.set_stance("force_eager") if o.compile else contextlib.nullcontext()
    with eager, FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter, \
            subject.phases.record(counter) as rec:
        out = run()
        sync()
    flops, flops_parts = counter.get_total_flops(), dict(rec["flops"])
    output_bytes = out.numel() * out.element_size()
    del out
    if o.compile:
        run()  # compiles for this size, outside the timed runs
        sync()
    seconds, parts = [], []
    for _ in range(o.repeats):
        with subject.phases.record() as rec:
            sync()
            t0 = time.perf_counter()
            out = run()
            sync()
            seconds.append(time.perf_counter() - t0)
        parts.append(dict(rec["seconds"]))
        del out
    row = dict(status="ok", seconds=statistics.median(seconds), seconds_all=seconds, flops=flops,
               flops_method="FlopCounterMode over the warm-up decode (matmul, conv, attention; 2 per MAC)",
               output_bytes=output_bytes)
    if flops_parts:
        row["flops_parts"] = flops_parts
        row["flops_parts"]["transformer"] = flops_parts.get("context", 0) + flops_parts.get("tokens", 0)
        part_s = {k: [p.get(k, 0.0) for p in parts] for k in PhaseTimer.PARTS}
        part_s["transformer"] = [c + t for c, t in zip(part_s["context"], part_s["tokens"])]
        part_s["other"] = [s - t - d for s, t, d in zip(seconds, part_s["transformer"], part_s["decoder"])]
        row["parts_seconds_all"] = part_s
        row["parts_seconds"] = {k: statistics.median(v) for k, v in part_s.items()}
    return row


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:  # "5" resets the peak RSS (VmHWM), Linux >= 4.0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def measure_rss(run: Callable[[], Tensor]) -> dict:
    """Peak RSS growth during one call of `run`, in this process."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # hand freed heap back, so reuse of it shows as growth
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss_now()
    reset = _reset_peak_rss()
    out = run()
    peak = _peak_rss() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(peak_bytes=max(peak - base, 0), output_bytes=out.numel() * out.element_size(), baseline_rss_bytes=base,
                method="VmHWM (reset via /proc/self/clear_refs) minus RSS after load" if reset else
                "getrusage ru_maxrss minus RSS after load (high-water mark not resettable here)")


def measure_cuda(run: Callable[[], Tensor], device: torch.device) -> dict:
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = run()
    torch.cuda.synchronize(device)
    return dict(peak_bytes=torch.cuda.max_memory_allocated(device) - base, output_bytes=out.numel() * out.element_size(),
                baseline_bytes=base, method="torch.cuda.max_memory_allocated minus allocated after load")


def measure_memory(subject: Subject, height: int, width: int, o: argparse.Namespace, seconds: float) -> dict | None:
    if o.memory == "off":
        return None
    if o.device.type == "cuda":
        return measure_cuda(subject.prepare(height, width), o.device)
    if o.memory == "inprocess":
        return {**measure_rss(subject.prepare(height, width)), "isolated": False}
    spec = dict(subject.spec, height=height, width=width, device=str(o.device), dtype=o.dtype,
                compile=o.compile, threads=torch.get_num_threads())
    cmd = [sys.executable, "-m", "infgen.bench", "--memory-worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(600.0, 10 * seconds + 120))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(error=f"memory worker exited {proc.returncode}: {tail}", isolated=True)
    return {**json.loads(lines[-1]), "isolated": True}


def _memory_worker(spec_json: str) -> int:
    """Child process of measure_memory: build the model, warm up, measure one decode, print JSON."""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    subject = SUBJECTS[spec["kind"]](spec, torch.device(spec["device"]), DTYPES[spec["dtype"]], spec["compile"])
    # Warm up thread pools and the allocator outside the measurement; with --compile, compile at this size.
    h, w = (spec["height"], spec["width"]) if spec["compile"] else (64, 64)
    subject.prepare(h, w)()
    print(json.dumps(measure_rss(subject.prepare(spec["height"], spec["width"]))), flush=True)
    return 0


def profile_case(subject: InfGenSubject, height: int, width: int, o: argparse.Namespace) -> dict:
    """torch.profiler over one decode (after a warm-up): the op table to a text file, the top ops to JSON."""
    from torch.profiler import ProfilerActivity, profile

    sync = _sync_fn(o.device)
    run = subject.prepare(height, width)
    run()
    cuda = o.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof, subject.phases.record():
        run()
        sync()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    path = o.out / f"profile_{subject.name}_{width}x{height}.txt"
    path.write_text(events.table(sort_by=key, row_limit=30))
    ops = [e for e in events if not e.key.startswith("infgen.")]
    total = sum(getattr(e, key) for e in ops) or 1
    top = sorted(ops, key=lambda e: getattr(e, key), reverse=True)[:12]
    parts = {e.key.removeprefix("infgen."): e.cpu_time_total / 1e6 for e in events if e.key.startswith("infgen.")}
    return dict(model=subject.name, size=f"{width}x{height}", table=str(path), sort_by=key, total_seconds=total / 1e6,
                parts_seconds=parts, top=[dict(op=e.key, calls=e.count, seconds=getattr(e, key) / 1e6,
                                               share=getattr(e, key) / total) for e in top])


# -- one model over all sizes --------------------------------------------------------------------------------
def bench_subject(subject: Subject, o: argparse.Namespace, peak: float) -> list[dict]:
    rows, last = [], None
    for height, width in o.sizes:
        row = dict(model=subject.name, kind=subject.kind, height=height, width=width, size=f"{width}x{height}",
                   megapixels=height * width / 1e6)
        if last is not None:
            flops = subject.predict_flops(height, width, last)
            row["predicted"] = dict(flops=flops, seconds=flops / last["flops_per_s"],
                                    method=f"{subject.predict_method}; time at the FLOP/s achieved at {last['size']}")
            if row["predicted"]["seconds"] > o.max_seconds and (height, width) not in subject.required:
                row.update(status="skipped", reason=f"predicted {row['predicted']['seconds']:.0f} s per decode > "
                                                     f"--max-seconds {o.max_seconds:g}")
                print(f"  {subject.name:14s} {row['size']:>10s}  skipped: {row['reason']}", flush=True)
                rows.append(row)
                continue
        try:
            row.update(time_case(subject, height, width, o))
            row["memory"] = measure_memory(subject, height, width, o, row["seconds"])
        except (RuntimeError, MemoryError, subprocess.TimeoutExpired) as e:
            row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"  {subject.name:14s} {row['size']:>10s}  error: {row['reason']}", flush=True)
            rows.append(row)
            continue
        _derive(row, peak)
        mem = (row.get("memory") or {}).get("peak_bytes")
        print(f"  {subject.name:14s} {row['size']:>10s}  {row['seconds']:9.3f} s  {row['flops'] / 1e9:10.1f} GFLOP  "
              f"{100 * row['fraction_of_peak']:5.1f}% peak" + (f"  {mem / 2**20:8.0f} MiB" if mem is not None else ""),
              flush=True)
        rows.append(row)
        last = row
    return rows


def _derive(row: dict, peak: float) -> None:
    row["flops_per_s"] = row["flops"] / row["seconds"]
    row["fraction_of_peak"] = row["flops_per_s"] / peak
    if "parts_seconds" in row:
        for part in ("transformer", "decoder"):
            s, f = row["parts_seconds"][part], row["flops_parts"].get(part, 0)
            row[f"{part}_flops_per_s"] = f / s if s > 0 else None
            row[f"{part}_fraction_of_peak"] = f / s / peak if s > 0 else None


# -- machine ---------------------------------------------------------------------------------------------------
def describe_machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        ram = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    m = dict(cpu_model=cpu, logical_cores=os.cpu_count(),
             usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
             ram_bytes=ram, torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
             python=platform.python_version(), platform=platform.platform(), device=str(device),
             load_average_start=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        m.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    with contextlib.suppress(Exception):
        m["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    return m


# -- entry point -----------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    if args.memory_worker:
        return _memory_worker(args.memory_worker)
    if args.pipeline:
        from . import bench_pipeline
        return bench_pipeline.run(args)
    o = _options(args)
    if o.threads:
        torch.set_num_threads(o.threads)
    specs = _specs(o)  # before anything is written: a missing optional dependency stops here
    o.out = o.out or Path(tempfile.mkdtemp(prefix="infgen-bench-"))
    o.doc = o.doc or o.out / "benchmarks.md"
    o.out.mkdir(parents=True, exist_ok=True)
    bench_report.write_all(measure(specs, o), o.out, o.doc)
    return 0


def measure(specs: list[dict], o: argparse.Namespace) -> dict:
    """Every case of every model, between two matmul peaks; the results dict that bench.json holds."""
    machine = describe_machine(o.device)
    # A GPU needs a large product to leave launch latency behind (512^3 read ~1% of an H200's bf16 rate).
    n = (4096 if o.quick else 8192) if o.device.type == "cuda" else (512 if o.quick else 2048)
    start = matmul_peak(o.device, o.torch_dtype, n)
    print(f"infgen bench: {machine['cpu_model']} ({machine['usable_cores']} cores, {machine['torch_threads']} threads), "
          f"{o.device} {o.dtype}; matmul peak {start['flops_per_s'] / 1e9:.1f} GFLOP/s; output {o.out}", flush=True)
    cases, profiles, infos = [], [], {}
    for spec in specs:
        subject = SUBJECTS[spec["kind"]](spec, o.device, o.torch_dtype, o.compile)
        infos[subject.name] = subject.info()
        cases += bench_subject(subject, o, start["flops_per_s"])
        if o.profile and subject.kind == "infgen":
            profiles.append(profile_case(subject, *o.profile, o))
        del subject
        gc.collect()
    end = matmul_peak(o.device, o.torch_dtype, n)
    peak = max(start["flops_per_s"], end["flops_per_s"])  # the machine's capability; a busy moment lowers one
    for r in cases:
        if r["status"] == "ok":
            _derive(r, peak)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    fit = fits(cases)
    return dict(
        format=1, created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine, json=str(o.out / "bench.json"),
        settings=dict(command="infgen bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
                      presets=o.presets, sizes=[f"{w}x{h}" for h, w in o.sizes], baselines=o.baselines,
                      repeats=o.repeats, max_seconds=o.max_seconds, device=str(o.device), dtype=o.dtype,
                      compile=o.compile, memory=o.memory, quick=o.quick, latent=o.latent),
        matmul_peak=dict(n=n, dtype=o.dtype, start=start["flops_per_s"], end=end["flops_per_s"], flops_per_s=peak,
                         seconds_all=start["seconds_all"] + end["seconds_all"]),
        models=infos, cases=cases, fits=fit, ratios=ratios(cases), targets=targets(cases, fit, o.presets, o.latent),
        profiles=profiles, plot=None)

if __name__ == "__main__":  # the memory worker: python -m infgen.bench --memory-worker SPEC_JSON
    _parser = argparse.ArgumentParser(prog="infgen.bench")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))

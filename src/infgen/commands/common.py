"""Helpers the `infgen decode / upscale / demo` commands share: loading, parsing, reading and safe writing.

Every user-facing failure here is a ValueError (or TypeError) with the offending path or value in ONE line;
cli.py prints it and exits 2. Inputs are validated before any output is written, and every output is
written to a temp file in its own folder and renamed, so an error never leaves half a file behind.
"""
from __future__ import annotations

import argparse
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..checkpoint import CONFIG_NAME, CheckpointError, load_safetensors
from ..config import DEFAULT_MAX_PIXELS
from ..images import check_file, image_format, one_line
from ..model import InfGen
from ..pipeline import InfGenPipeline
from ..precision import fast_dtype
from ..utils import DTYPES

LATENT_SUFFIXES = (".safetensors", ".npy", ".pt", ".pth")


# -- arguments ---------------------------------------------------------------------------------------------
def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every decoding command takes (checkpoint, device, caps, chunking, progress)."""
    parser.add_argument("--checkpoint", metavar="DIR", default=None,
                        help="a bundle directory (infgen/ + codec/ + bundle.json) or a bare InfGen checkpoint "
                             "directory (no codec: no extrapolation); default: the bundled weights")
    parser.add_argument("--no-extrapolate", action="store_true",
                        help="decode in one pass even beyond the trained scale range (no re-encode loop)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help=f"refuse outputs above N pixels (default {DEFAULT_MAX_PIXELS}; 0 lifts the cap)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to decode (default cpu)")
    add_dtype_argument(parser)
    parser.add_argument("--chunk-size", type=int, default=None, metavar="N",
                        help="decode in tiles of N x N 8-px cells (default: from a 768 MiB activation-estimate budget)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-file lines")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                        help="InfGen's compute dtype. auto (default): bf16 on CPUs with AVX512-BF16 or AMX and "
                             "on GPUs that support it (~2x faster, outputs within ~1 level of 8-bit), fp32 "
                             "elsewhere; fp16: GPUs only")


def decode_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of InfGenPipeline.decode that the shared options set."""
    if args.chunk_size is not None:
        positive_int("--chunk-size", args.chunk_size)
    return dict(chunk_size=args.chunk_size, extrapolate=not args.no_extrapolate,
                max_pixels=max_pixels(args.max_pixels), progress=not args.quiet)


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def max_pixels(n: int) -> int | None:
    if n < 0:
        raise ValueError(f"--max-pixels must be >= 0 (0 lifts the cap), got {n}")
    return None if n == 0 else n


def parse_size(text: str) -> tuple[int, int]:
    """'7680x4320' (WIDTH x HEIGHT, like a screen resolution) -> (height, width)."""
    m = re.fullmatch(r"\s*(-?\d+)\s*[xX]\s*(-?\d+)\s*", str(text))
    if m is None:
        raise ValueError(f"size must be WIDTHxHEIGHT with positive integers, e.g. 7680x4320; got {text!r}")
    width, height = int(m.group(1)), int(m.group(2))
    if width < 1 or height < 1:
        raise ValueError(f"size {text!r}: width and height must be >= 1")
    return height, width


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1920x1080,512x512' -> [(1080, 1920), (512, 512)]."""
    sizes = [parse_size(s) for s in str(text).split(",") if s.strip()]
    if not sizes:
        raise ValueError(f"expected a comma-separated list of WIDTHxHEIGHT sizes, got {text!r}")
    return sizes


# -- model -------------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available in this torch build / on this machine")
    return torch.device(name)


def resolve_dtype(name: str, device: str | torch.device) -> str:
    """--dtype value -> fp32 | bf16 | fp16; auto: the fastest type the device computes natively."""
    if name == "auto":
        return {torch.bfloat16: "bf16", torch.float32: "fp32"}[fast_dtype(device)]
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected auto or one of {sorted(DTYPES)}")
    if name == "fp16" and torch.device(device).type == "cpu":
        raise ValueError("--dtype fp16 is for GPUs (slow and unsupported for some CPU kernels); on CPU use bf16")
    return name


def load_pipeline(checkpoint: str | Path | None, device: str | torch.device = "cpu",
                  dtype: str = "auto") -> tuple[InfGenPipeline, str]:
    """A bundle dir, a bare InfGen checkpoint dir (no codec), or None for the bundled default.

    dtype: auto | fp32 | bf16 | fp16, the InfGen decoder's dtype. Returns the pipeline and a short
    description that names the dtype (and says when it was picked automatically)."""
    chosen = resolve_dtype(dtype, device)
    pipe, what = _load_pipeline(checkpoint, device)
    pipe.model.to(DTYPES[chosen])
    if chosen == "bf16" and pipe.codec is not None:
        # The encoder in bf16 too: 2x faster (the extrapolation loop re-encodes big images) and, on the
        # bundled default, 2x PSNR unchanged (tests/test_default_model.py). Not fp16: some VAEs overflow in it.
        pipe.codec.to(torch.bfloat16)
    return pipe, f"{what}, {chosen}" + (" (auto)" if dtype == "auto" else "")


def _load_pipeline(checkpoint: str | Path | None, device: str | torch.device) -> tuple[InfGenPipeline, str]:
    from .. import pipeline as pipeline_module  # read DEFAULT_BUNDLE at call time (tests redirect it)

    if checkpoint is None:
        default = Path(pipeline_module.DEFAULT_BUNDLE)
        if not (default / "infgen").is_dir():
            raise CheckpointError(f"no --checkpoint given and the bundled default weights are not installed "
                                  f"({default} is missing); pass --checkpoint DIR")
        return InfGenPipeline.from_pretrained(None, device=device), f"bundled default ({default})"
    path = Path(checkpoint)
    if not path.exists():
        if len(str(checkpoint).split("/")) == 2 and not str(checkpoint).startswith((".", "/", "~")):
            try:  # a hub id, for users with internet
                return InfGenPipeline.from_pretrained(str(checkpoint), device=device), f"hub bundle {checkpoint}"
            except ImportError as e:
                raise ValueError(f"--checkpoint {checkpoint}: no such directory, and loading it as a hub id "
                                 f"needs huggingface_hub ({e})") from None
        raise CheckpointError(f"--checkpoint {checkpoint}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint {path} is a file; expected a bundle directory (infgen/, codec/, "
                              f"bundle.json) or an InfGen checkpoint directory ({CONFIG_NAME} + model.safetensors)")
    if (path / "infgen").is_dir():
        return InfGenPipeline.from_pretrained(path, device=device), f"bundle {path}"
    if (path / CONFIG_NAME).is_file():
        return InfGenPipeline(InfGen.from_pretrained(path, device=device)), \
            f"bare InfGen checkpoint {path} (no codec: no extrapolation, no upscale)"
    raise CheckpointError(f"--checkpoint {path} is neither an infgen bundle (no infgen/ inside) nor an InfGen "
                          f"checkpoint (no {CONFIG_NAME})")


# -- inputs ------------------------------------------------------------------------------------------------
def expand_inputs(paths: list[str | Path], suffixes: tuple[str, ...], what: str) -> tuple[list[Path], bool]:
    """Files as given, folders expanded to their (sorted, non-hidden) files with `suffixes`.

    Returns the files and whether any came from a folder (then the output is always a folder)."""
    files, from_folder = [], False
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes
                           and not f.name.startswith("."))
            if not found:
                raise ValueError(f"{p} is a folder with no {what} ({', '.join(suffixes)})")
            files += found
            from_folder = True
        elif not p.exists():
            raise ValueError(f"{p}: no such file or folder")
        elif p.suffix.lower() not in suffixes:
            raise ValueError(f"{p}: unsupported {what} type {p.suffix or '(no suffix)'!r}; "
                             f"expected {', '.join(suffixes)}")
        else:
            files.append(p)
    return files, from_folder


def read_latents(path: Path) -> torch.Tensor:
    """A latent file -> float tensor (B, C, h, w). Never unpickles: .pt goes through weights_only=True."""
    path = Path(path)
    check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        z = _pick_tensor(load_safetensors(path), path)  # refuses pickles renamed to .safetensors
    elif suffix == ".npy":
        try:
            z = torch.from_numpy(np.load(path, allow_pickle=False))
        except (ValueError, OSError, EOFError, TypeError) as e:
            raise ValueError(f"{path} is not a plain numeric .npy array ({one_line(e)})") from None
    elif suffix in (".pt", ".pth"):
        try:
            with warnings.catch_warnings():  # e.g. "pickle protocol 4": stderr must stay one line
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            if found:  # the weights-only unpickler met a class: running it would mean arbitrary code
                raise ValueError(f"{path} holds a Python object ({found.group(1)}) that needs unpickling, which "
                                 f"infgen never does (torch.load weights_only=True); save plain tensors, e.g. "
                                 f"torch.save({{'latents': z}}, path), or use .safetensors") from None
            raise ValueError(f"{path} is not a readable torch.save file (weights-only load failed)") from None
        except Exception as e:  # torch raises RuntimeError/EOFError/... for garbage; all are bad input here
            raise ValueError(f"{path} is not a readable torch.save file ({type(e).__name__}: {one_line(e)})") from None
        z = obj if isinstance(obj, torch.Tensor) else _pick_tensor(obj, path)
    else:
        raise ValueError(f"{path}: unsupported latent file type {suffix!r}; expected {', '.join(LATENT_SUFFIXES)}")
    if z.ndim == 3:
        z = z.unsqueeze(0)                                   # (C, h, w) -> (1, C, h, w)
    if z.ndim != 4:
        raise ValueError(f"{path}: latents must be (C, h, w) or (B, C, h, w), got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"{path}: latents must be floating point, got {z.dtype}")
    return z.float()


def _pick_tensor(obj, path: Path) -> torch.Tensor:
    """A file's tensors -> the latents: the only tensor, or the one named 'latents'."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected a tensor or a dict with 'latents'")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if "latents" in tensors:
        return tensors["latents"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"{path} holds {len(tensors)} tensors {sorted(map(str, tensors))[:8]}; expected a single "
                     "tensor or one named 'latents'")


# -- outputs -----------------------------------------------------------------------------------------------
def plan_outputs(out: str | Path, items: list[tuple[Path, int]], folder_mode: bool) -> list[list[Path]]:
    """Where each output goes. items: (input file, number of images it yields).

    One input yielding one image -> OUT itself (or OUT/<stem>.png when OUT is a folder or has no suffix);
    one input yielding B images -> OUT_<i>.png; several inputs or a folder input -> OUT/<stem>[_<i>].png.
    Refuses collisions and outputs that would overwrite an input, before anything is written."""
    out = Path(out)
    total = sum(n for _, n in items)
    as_folder = folder_mode or len(items) > 1 or out.is_dir() or out.suffix == ""
    if as_folder:
        if out.exists() and not out.is_dir():
            raise ValueError(f"-o {out} is a file, but the outputs go to a folder ({total} images)")
        if not out.exists() and out.suffix.lower() in Image.registered_extensions():
            raise ValueError(f"-o {out} looks like a file name, but there are {len(items)} inputs; "
                             "pass a folder for the outputs")
        plan = [[out / (f"{p.stem}.png" if n == 1 else f"{p.stem}_{i}.png") for i in range(n)] for p, n in items]
    else:
        image_format(out)
        (p, n), = items
        plan = [[out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]]
    flat = [resolved(q) for paths in plan for q in paths]
    if len(set(flat)) != len(flat):
        dup = sorted({str(q) for q in flat if flat.count(q) > 1})
        raise ValueError(f"two inputs would write the same output file {dup[0]} (same file name in "
                         "different folders?); decode them separately")
    inputs = {resolved(p) for p, _ in items}
    for q in flat:
        if q in inputs:
            raise ValueError(f"output {q} would overwrite an input; choose another -o")
    for folder in sorted({q.parent for q in flat}):
        check_writable(folder)
    return plan


def resolved(path: Path) -> Path:
    """path.resolve(), with a symlink loop as a one-line ValueError instead of RuntimeError."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path}: cannot resolve the path ({one_line(e)})") from None


def check_writable(folder: Path) -> None:
    """Before any decoding: the output folder (or the nearest existing folder above it, where it would be
    created) must take a new file. Probes with a real temp file, so read-only filesystems are caught too."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write outputs to {folder}: {existing} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".infgen-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write outputs to {folder}: {e.strerror or one_line(e)} in {existing}") from None


def megapixels_per_s(height: int, width: int, seconds: float) -> float:
    return height * width / 1e6 / max(seconds, 1e-9)


def fmt_size(height: int, width: int) -> str:
    return f"{width}x{height}"


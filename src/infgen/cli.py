"""`infgen` command line: subcommands as a table of (module, help) that each own their arguments.

Every subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported only
when their subcommand runs, so `infgen --help` is instant and optional extras stay optional.
User errors (bad paths, sizes, checkpoints) become one line on stderr and exit code 2, no traceback;
set INFGEN_DEBUG=1 to see the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "decode": ("infgen.commands.decode", "decode latents (.safetensors/.npy) to images of any size"),
    "upscale": ("infgen.commands.upscale", "re-render images at any size (encode, then InfGen decode)"),
    "train": ("infgen.train", "train InfGen or the small autoencoder (accelerate: 1 CPU to many GPUs)"),
    "data": ("infgen.photos", "collect the offline real-photo dataset and its fixed split"),
    "eval": ("infgen.evaluate", "InfGen against resize baselines: PSNR/SSIM/MS-SSIM, KID/patch-FID/sFID, "
                                "precision/recall, with bootstrap intervals"),
    "bench": ("infgen.bench", "decode latency, memory and FLOP/s against baselines"),
    "serve": ("infgen.serve", "demo web page (gradio)"),
    "bundle": ("infgen.commands.bundle", "assemble a bundle (InfGen + codec + bundle.json) from trained exports"),
    "demo": ("infgen.commands.demo", "the `make demo` job: decode/upscale samples, write PNGs and timings"),
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infgen", description="InfGen: decode diffusion latents to any size.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        parser = build_parser(load=command)
    except ImportError as e:  # an optional extra is missing
        print(f"infgen: error: `infgen {command}` needs an optional dependency: {e}. "
              f"Install it with pip install 'infgen[...]' (see README).", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("infgen: interrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        print(f"infgen {command}: error: needs an optional dependency ({e}); see the README's install notes",
              file=sys.stderr)
        return 2
    except MemoryError:
        print(f"infgen {command}: error: out of memory; try a smaller size or --chunk-size", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():  # torch.OutOfMemoryError and CPU allocator failures
            raise
        print(f"infgen {command}: error: out of memory; try a smaller size or --chunk-size", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get("INFGEN_DEBUG"):
            raise
        print(f"infgen {command}: error: {e}", file=sys.stderr)
        return 2

"""`infgen bundle`: assemble a bundle (infgen/ + codec/ + bundle.json) from two trained exports.

The bundled default in src/infgen/assets/default was made with this command (see `make train-default`).
"""
from __future__ import annotations

import argparse

from ..codecs import load_codec
from ..model import InfGen
from ..pipeline import BundleInfo, InfGenPipeline


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--infgen", required=True, help="InfGen export (train OUTPUT/final)")
    p.add_argument("--codec", required=True, help="codec export (autoencoder OUTPUT/final) or diffusers VAE")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--train-latent", type=int, default=32, help="side of the training latents (input_size / 8)")
    p.add_argument("--max-scale", type=float, default=4.0, help="largest trained output/latent scale (out_max / input_size)")
    p.add_argument("--max-step-scale", type=float, default=2.0, help="per-step bound of the extrapolation loop")
    p.add_argument("--window-margin", type=int, default=4, help="latent cells of context around each window")


def run(args: argparse.Namespace) -> int:
    info = BundleInfo(args.train_latent, args.max_scale, args.max_step_scale, args.window_margin)  # validates
    model = InfGen.from_pretrained(args.infgen)
    InfGenPipeline(model, load_codec(args.codec), info).save_pretrained(args.out)  # checks they match
    print(f"wrote bundle {args.out}: InfGen {model.num_parameters() / 1e6:.1f}M parameters, {info}")
    return 0

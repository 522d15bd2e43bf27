"""Figures of a codec training run for docs/training.md: the validation curve and a side-by-side of a photo
reconstructed by two codecs (e.g. the first bundled 4-channel codec and the 16-channel one).

    python scripts/codec_figures.py curve runs/autoencoder-16ch/metrics.jsonl --out docs/img/codec-16ch-curve.png
    python scripts/codec_figures.py compare src/infgen/assets/samples/lomiri-Dragonfly_by_Bolly.jpg \\
        --codec "4 channels (first bundle)=src/infgen/assets/default/codec" \\
        --codec "16 channels=runs/autoencoder-16ch/final" --out docs/img/codec-dragonfly.png
"""
import argparse
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from infgen.autoencoder import KLAutoencoder
from infgen.metrics import psnr
from infgen.pipeline import pil_to_tensor, tensor_to_pil


def curve(metrics: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    val = [(m["step"], m["val_psnr"]) for m in lines if "val_psnr" in m]
    train = [(m["step"], m["l1"]) for m in lines if "l1" in m]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot(*zip(*val), "o-", color="C0", label="validation PSNR (dB), 256² centre crops, 1x")
    ax.set_xlabel("step")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(*zip(*train), color="C1", alpha=0.5, lw=0.8, label="train L1 (128² crops)")
    ax2.set_ylabel("train L1")
    ax2.set_yscale("log")
    fig.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}; last validation PSNR {val[-1][1]:.2f} dB at step {val[-1][0]}")


@torch.no_grad()
def compare(image: Path, codecs: list[str], out: Path, zoom: int) -> None:
    x = pil_to_tensor(Image.open(image))                                       # (1, 3, H, W) in [-1, 1]
    panels = [("input", x)]
    for spec in codecs:
        label, _, path = spec.rpartition("=")
        ae = KLAutoencoder.from_pretrained(path).eval()
        rec = ae.decode(ae.encode(x)[0])[..., : x.shape[-2], : x.shape[-1]].clamp(-1, 1)
        db = float(psnr(rec * 0.5 + 0.5, x * 0.5 + 0.5)[0])
        panels.append((f"{label or path}: {db:.2f} dB", rec))
    ims = [(t, tensor_to_pil(p[0]).resize((p.shape[-1] * zoom, p.shape[-2] * zoom), Image.NEAREST)) for t, p in panels]
    pad, text = 6, 16
    sheet = Image.new("RGB", (sum(im.width for _, im in ims) + pad * (len(ims) + 1), ims[0][1].height + text + 2 * pad),
                      "white")
    draw, x0 = ImageDraw.Draw(sheet), pad
    for t, im in ims:
        draw.text((x0, pad // 2), t, fill="black")
        sheet.paste(im, (x0, pad + text))
        x0 += im.width + pad
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out}: " + "; ".join(t for t, _ in panels[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("curve")
    c.add_argument("metrics", type=Path)
    c.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("compare")
    s.add_argument("image", type=Path)
    s.add_argument("--codec", action="append", required=True, metavar="LABEL=DIR")
    s.add_argument("--zoom", type=int, default=1)
    s.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.what == "curve":
        curve(a.metrics, a.out)
    else:
        compare(a.image, a.codec, a.out, a.zoom)


if __name__ == "__main__":
    main()

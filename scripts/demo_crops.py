"""Side-by-side crops of `make demo` outputs at native resolution, for the README: the bicubic resize of the
demo's low-resolution input beside InfGen's render of its latent, same box, no rescaling.

    make demo     # writes outputs/demo/<sample>_<W>x<H>_{input,bicubic,infgen}.png
    python scripts/demo_crops.py outputs/demo --sample lomiri-Dragonfly_by_Bolly --size 1920x1080 \\
        --box 820,250,640,360 --out docs/img/demo-dragonfly-1080p.png
"""
import argparse
from pathlib import Path

from PIL import Image, ImageDraw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path, help="the folder `infgen demo` wrote")
    ap.add_argument("--sample", required=True, help="sample photo stem, e.g. lomiri-Dragonfly_by_Bolly")
    ap.add_argument("--size", required=True, help="WIDTHxHEIGHT of the demo output, e.g. 1920x1080")
    ap.add_argument("--box", required=True, help="LEFT,TOP,WIDTH,HEIGHT of the crop in output pixels")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    left, top, w, h = (int(v) for v in a.box.split(","))
    stem = a.demo / f"{a.sample}_{a.size}"
    small = Image.open(f"{stem}_input.png")
    panels = [(f"bicubic resize of the {small.width}x{small.height} input", Image.open(f"{stem}_bicubic.png")),
              ("InfGen (bundled default) from its latent", Image.open(f"{stem}_infgen.png"))]
    pad, text = 6, 16
    sheet = Image.new("RGB", (len(panels) * (w + pad) + pad, h + text + 2 * pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, im) in enumerate(panels):
        if im.size != panels[0][1].size or left + w > im.width or top + h > im.height:
            raise SystemExit(f"box {a.box} does not fit the {im.width}x{im.height} image {label!r}")
        x0 = pad + i * (w + pad)
        draw.text((x0, pad // 2), f"{label}, {a.size} crop", fill="black")
        sheet.paste(im.crop((left, top, left + w, top + h)), (x0, pad + text))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

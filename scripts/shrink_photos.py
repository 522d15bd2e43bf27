"""Copy a split's photos with the long side capped (Lanczos) and re-saved as JPEG, plus the copy's split list.

Stage 4 of `make train-default` trained on such a copy: the lent GPU machine takes at most 64 MiB of files
with the repository, and the 70 training photos are 47 MB as shipped (32 MB at <= 2400 px, quality 92).
Training crops are only ever downsampled, so the cap narrows the range of crop scales; the copy is also
re-encoded as JPEG (lossy for PNG sources).

    python scripts/shrink_photos.py --split data/splits/train.txt --root data/photos --out data/photos-2400
"""
import argparse
from pathlib import Path

from PIL import Image, ImageOps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", required=True, help="split list, one name per line relative to --root")
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True, help="writes OUT/<stem>.jpg and OUT/train.txt")
    p.add_argument("--long-side", type=int, default=2400)
    p.add_argument("--quality", type=int, default=92)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in Path(a.split).read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    stems = [Path(n).stem for n in names]
    if len(set(stems)) != len(stems):
        raise SystemExit(f"shrink_photos: two photos share a file stem in {a.split}; the copies would overwrite each other")
    written, total = [], 0
    for name in names:
        with Image.open(Path(a.root) / name) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")  # upright, as the training loader sees it
            w, h = im.size
            f = min(1.0, a.long_side / max(w, h))
            if f < 1:
                im = im.resize((round(w * f), round(h * f)), Image.LANCZOS)
            dst = out / (Path(name).stem + ".jpg")
            im.save(dst, "JPEG", quality=a.quality)
        written.append(dst.name)
        total += dst.stat().st_size
    (out / "train.txt").write_text("".join(n + "\n" for n in written))
    print(f"wrote {len(written)} photos ({total / 1e6:.1f} MB) and {out / 'train.txt'}")


if __name__ == "__main__":
    main()

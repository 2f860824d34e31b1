"""Quickstart: segment a picture with a few words and save the overlay.

    python examples/quickstart.py                         # a sample photo (scikit-image's cat), ProxyCLIP + DINO-B/8
    python examples/quickstart.py --image photo.jpg --labels "horse, grass; lawn, sky, tree" --method naclip
    python examples/quickstart.py --random                # no downloads: seeded random weights (a smoke test)

The first real run downloads CLIP ViT-B/16 (OpenAI) and DINO ViT-B/8 into the open_clip / timm caches.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ovseg import Segmenter


def sample_photo():
    """scikit-image's freely licensed cat photo when scikit-image is installed, else a generated picture."""
    try:
        from skimage import data

        return data.chelsea(), "cat, wall, floor; ground"
    except ImportError:
        return demo_picture(), "sky, sun, mountain; hill, grass"


def demo_picture(size=(480, 360)) -> Image.Image:
    """A simple landscape: sky, sun, hills, grass (generated, so no photo is shipped)."""
    w, h = size
    img = Image.new("RGB", size, (120, 170, 235))
    d = ImageDraw.Draw(img)
    d.ellipse((w * 0.7, h * 0.08, w * 0.85, h * 0.28), fill=(255, 220, 60))
    d.polygon([(0, h * 0.55), (w * 0.35, h * 0.3), (w * 0.7, h * 0.6), (w, h * 0.45), (w, h), (0, h)],
              fill=(90, 110, 80))
    d.rectangle((0, h * 0.7, w, h), fill=(70, 160, 60))
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", help="path of a photo (default: scikit-image's cat photo when scikit-image is "
                                    "installed, else a generated landscape)")
    ap.add_argument("--labels", default=None, help="comma-separated labels, ';' between synonyms")
    ap.add_argument("--method", default="proxyclip")
    ap.add_argument("--random", action="store_true", help="seeded random weights instead of downloads")
    ap.add_argument("--out", default="out/quickstart_overlay.png")
    args = ap.parse_args()

    weights = dict(clip_weights="random", vfm_weights="random") if args.random else {}
    if args.method != "proxyclip":
        weights.pop("vfm_weights", None)
    seg = Segmenter(args.method, **weights)
    image, default_labels = (args.image, "") if args.image else sample_photo()
    labels = [s.strip() for s in (args.labels or default_labels or "object, background").split(",") if s.strip()]
    res = seg.predict(image, labels, progress=True)
    for label, share in res.fractions().items():
        print(f"{label:>12}: {share:6.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    res.overlay().save(args.out)
    print(f"{seg!r}\noverlay written to {args.out} ({np.asarray(res.overlay()).shape[1]}x{res.size[0]})")


if __name__ == "__main__":
    main()

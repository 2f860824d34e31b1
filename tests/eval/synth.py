"""Tiny synthetic benchmarks in each dataset's on-disk layout (generated at test time)."""
from pathlib import Path

import numpy as np
from PIL import Image

from ovseg.eval.datasets import DATASETS


def _img(seed, h, w):
    rng = np.random.RandomState(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2] = rng.randint(0, 255, 3)
    img[h // 2:] = rng.randint(0, 255, 3)
    return img


def label_for(name, seed, h, w):
    """Labels whose values identify the sample (so pairing can be checked) and exercise ignore values."""
    spec = DATASETS[name]
    lab = np.full((h, w), seed % spec.num_classes, np.int64)
    lab[: h // 3] = (seed + 3) % spec.num_classes
    lab[-2:, :] = 255 if name not in ("ade847", "pc459") else 65535  # ignore / out-of-range border
    if spec.reduce_zero_label:
        lab[h // 3: h // 2] = 0  # becomes ignore after reduce_zero_label
    return lab


def make_dataset(name, root, n=3, size=(48, 64), extra_unlabelled=True):
    """Write ``n`` samples of dataset ``name`` under ``root``; returns [(id, label array as written)]."""
    spec = DATASETS[name]
    root = Path(root)
    ids = [f"city{i % 2}/s{i:03d}" if spec.nested else f"s{i:03d}" for i in range(n)]
    written = []
    for k, sid in enumerate(ids):
        h, w = size[0] + 4 * k, size[1] + 2 * k
        img_p = root / spec.img_dir / f"{sid}{spec.img_suffix}"
        ann_p = root / spec.ann_dir / f"{sid}{spec.ann_suffix}"
        img_p.parent.mkdir(parents=True, exist_ok=True)
        ann_p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_img(k, h, w)).save(img_p, quality=95) if img_p.suffix == ".jpg" else \
            Image.fromarray(_img(k, h, w)).save(img_p)
        lab = label_for(name, k, h, w)
        if ann_p.suffix == ".tif":
            Image.fromarray(lab.astype(np.uint16)).save(ann_p)
        else:
            Image.fromarray(lab.astype(np.uint8)).save(ann_p)
        written.append((sid, lab))
    if spec.split_file:
        split = root / spec.split_file
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("\n".join(ids) + "\n")
    elif extra_unlabelled:  # listing-based layouts skip images without labels
        p = root / spec.img_dir / (("city0/zz_unlabelled" if spec.nested else "zz_unlabelled") + spec.img_suffix)
        Image.fromarray(_img(99, 32, 32)).save(p)
    return written

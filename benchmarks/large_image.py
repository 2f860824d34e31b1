"""Peak memory of one prediction on a large image (random weights of the real architectures).

    python benchmarks/large_image.py --method naclip --size 8000x6000
    python benchmarks/large_image.py --method proxyclip --size 1024x768
    python benchmarks/large_image.py --method clearclip --size 4000x3000 --labels 100 [--probs]
    python benchmarks/large_image.py --method corrclip --size 8000x6000      # given masks (an int64 label image)

Prints the peak resident memory of the process (ru_maxrss) after building the models and after the prediction,
and the sizes of the unavoidable input/output arrays, so the overhead beyond them can be read off.
"""
import argparse
import resource
import time

import numpy as np


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="naclip")
    ap.add_argument("--size", default="8000x6000", help="WIDTHxHEIGHT")
    ap.add_argument("--labels", type=int, default=4)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--probs", action="store_true", help="also return the full (C, H, W) probabilities")
    args = ap.parse_args()
    from ovseg import Segmenter

    w, h = (int(v) for v in args.size.split("x"))
    from ovseg.methods import get_method

    kw = dict(clip_weights="random", templates="single", precision=args.precision)
    preset = get_method(args.method)
    if preset.vfm_names():
        kw["vfm_weights"] = {role: "random" for role in preset.vfm_names()}
    masks = None
    if "mask_generator" in preset.option_names():  # given region masks: 48 x 64 blocks of the image
        kw["mask_generator"] = "none"
        yy, xx = np.mgrid[0:h, 0:w]
        masks = (yy * 48 // h) * 64 + (xx * 64 // w) + 1
    seg = Segmenter(args.method, **kw)
    labels = [f"class {i}" for i in range(args.labels)]
    seg.text_embeddings(labels)
    built = rss_mb()
    img = np.random.RandomState(0).randint(0, 255, (h, w, 3), dtype=np.uint8)
    io_masks = masks.nbytes / 2**20 if masks is not None else 0.0
    t = time.perf_counter()
    res = seg.predict(img, labels, return_probs=args.probs, masks=masks)
    dt = time.perf_counter() - t
    outputs = [res.label_map, res.score] + ([res.probs] if args.probs else [])
    io_mb = (img.nbytes + sum(a.nbytes for a in outputs)) / 2**20 + io_masks
    peak = rss_mb()
    print(f"{args.method} {w}x{h}, {args.labels} labels, {args.precision}: {dt:.1f} s")
    print(f"peak RSS after building models: {built:.0f} MB; after predict: {peak:.0f} MB")
    print(f"input + outputs (uint8 image, int32 labels, float32 score{', float32 probs' if args.probs else ''}): "
          f"{io_mb:.0f} MB; "
          f"peak beyond models + I/O arrays: {peak - built - io_mb:.0f} MB")


if __name__ == "__main__":
    main()

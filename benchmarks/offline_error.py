"""Time from ``Segmenter(...)`` to the weights error when the weights are not cached (run it without network).

    python benchmarks/offline_error.py --method naclip     # Segmenter('naclip'): no network, HF_HUB_OFFLINE unset
    HF_HUB_OFFLINE=1 python benchmarks/offline_error.py     # offline mode
    python benchmarks/offline_error.py --vfm dino_b8        # create_vfm('dino_b8') alone (also: sd15)

Imports (torch, open_clip, timm, and diffusers/transformers for SD) are done before the clock starts: on a busy
machine they dominate the wall time of a fresh process.
Prints the seconds to the error, the number of log records emitted meanwhile (retry warnings), the error class
and its first 160 characters. Point ``HF_HUB_CACHE`` at an empty folder to be sure nothing is cached.
"""
import argparse
import logging
import time


class _Count(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.n = 0

    def emit(self, record):
        self.n += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="naclip")
    ap.add_argument("--vfm", default=None, help="time create_vfm(VFM) instead of Segmenter(METHOD)")
    args = ap.parse_args()
    import open_clip  # noqa: F401  (imports outside the clock)
    import timm  # noqa: F401

    from ovseg import Segmenter
    from ovseg.backbones import create_vfm

    if args.vfm and args.vfm.startswith("sd"):  # diffusers/transformers import their model classes lazily
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    counter = _Count()
    logging.getLogger().addHandler(counter)
    t0 = time.perf_counter()
    try:
        if args.vfm:
            create_vfm(args.vfm)
        else:
            Segmenter(args.method, device="cpu")
        print("loaded (the weights are cached)")
    except Exception as e:  # the measured error, whatever its class
        dt = time.perf_counter() - t0
        print(f"{dt:.2f} s to {type(e).__name__}; {counter.n} warning records; {str(e)[:160]}")


if __name__ == "__main__":
    main()

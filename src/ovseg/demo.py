"""``ovseg demo``: a Gradio web demo of every method (``pip install "ovseg[demo]"``); see docs/demo.md.

Gradio is imported inside the functions that need it, so ``import ovseg`` (and ``import ovseg.demo``) stays light.
The model side (:class:`SegmenterCache`, :func:`run_prediction`, :func:`render_overlay`) has no Gradio in it and
works with any :class:`~ovseg.Segmenter`; :func:`build_demo` wires it to a ``gr.Blocks`` app.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import __version__
from .errors import InvalidInputError, OvsegError

logger = logging.getLogger(__name__)

__all__ = ["SegmenterCache", "DemoOutput", "split_labels", "run_prediction", "render_overlay", "build_demo",
           "launch_demo"]

ALPHA = 0.5  # mask opacity of the overlay
EXAMPLE_LABELS = "cat, sofa; couch, floor, wall"
#: ``factory(method, vfm, vfm_weights) -> Segmenter``; ``vfm`` and ``vfm_weights`` are None for methods without one.
SegmenterFactory = Callable[[str, Optional[str], Optional[str]], Any]


def method_vfm(method: str) -> Optional[str]:
    """The preset VFM of ``method`` (None when the method uses no VFM). Unknown names raise ovseg's
    did-you-mean error."""
    from .methods import get_method

    if not isinstance(method, str) or not method.strip():
        raise InvalidInputError(f"method must be a name, got {method!r}; choose one of {_method_names()}")
    return get_method(method.strip()).vfm_names().get("vfm")


def _method_names() -> List[str]:
    from .methods import list_methods

    return list_methods()


def _vfm_names() -> List[str]:
    from .backbones import list_vfms

    return list_vfms()


class SegmenterCache:
    """Builds a Segmenter per (method, VFM) on first use and keeps the ``size`` most recently used ones.

    The weights are fixed for the whole app: ``clip_weights`` (inside ``segmenter_kwargs`` or the factory) serves
    every method; ``vfm_weights`` is ``None`` (each VFM's official weights), ``"random"`` (every VFM), or a file,
    which holds the weights of one VFM only, ``weights_vfm``; other VFMs then use their official weights.

    Args:
        factory: ``factory(method, vfm, vfm_weights) -> Segmenter``; default ``Segmenter(method, vfm=vfm,
            vfm_weights=vfm_weights, **segmenter_kwargs)``.
        vfm_weights: see above.
        weights_vfm: the VFM a ``vfm_weights`` file belongs to (required for a file).
        size: how many segmenters stay in memory (at least 1).
        **segmenter_kwargs: passed to :class:`~ovseg.Segmenter` by the default factory (``clip``, ``clip_weights``,
            ``device``, ``precision``, ``clip_kwargs``, ``vfm_kwargs``, preset options, ...).
    """

    def __init__(self, factory: Optional[SegmenterFactory] = None, *, vfm_weights: Optional[str] = None,
                 weights_vfm: Optional[str] = None, size: int = 2, **segmenter_kwargs: Any):
        if factory is not None and segmenter_kwargs:
            raise InvalidInputError(f"give either a factory or Segmenter keyword arguments, not both "
                                    f"(got {sorted(segmenter_kwargs)})")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidInputError(f"size must be an int >= 1, got {size!r}")
        if vfm_weights not in (None, "random") and weights_vfm is None:
            raise InvalidInputError(f"vfm_weights={vfm_weights!r} is a file of one VFM; say which with --vfm NAME "
                                    f"(one of {', '.join(_vfm_names())})")
        self._factory = factory or self._default_factory
        self._kwargs = segmenter_kwargs
        self.vfm_weights = vfm_weights
        self.weights_vfm = weights_vfm
        self.size = size
        self._models: "OrderedDict[Tuple[str, Optional[str]], Any]" = OrderedDict()
        self._lock = threading.Lock()

    def _default_factory(self, method: str, vfm: Optional[str], vfm_weights: Optional[str]):
        from .segmenter import Segmenter

        return Segmenter(method, vfm=vfm, vfm_weights=vfm_weights, **self._kwargs)

    def resolve(self, method: str, vfm: Optional[str]) -> Tuple[str, Optional[str], Optional[str]]:
        """(method, VFM, VFM weights) that :meth:`get` builds: the VFM is dropped for methods without one and
        defaults to the method's preset; unknown method names raise."""
        method = method.strip() if isinstance(method, str) else method
        preset_vfm = method_vfm(method)
        if preset_vfm is None:
            return method, None, None
        vfm = (vfm.strip() if isinstance(vfm, str) else vfm) or preset_vfm
        return method, vfm, self.weights_for(vfm)

    def weights_for(self, vfm: str) -> Optional[str]:
        """The ``vfm_weights`` passed when building ``vfm``."""
        if self.vfm_weights in (None, "random"):
            return self.vfm_weights
        return self.vfm_weights if vfm == self.weights_vfm else None

    def get(self, method: str, vfm: Optional[str] = None):
        """The segmenter for (method, VFM), built on first use (may take a while: it loads the weights)."""
        method, vfm, weights = self.resolve(method, vfm)
        key = (method, vfm)
        with self._lock:
            seg = self._models.get(key)
            if seg is not None:
                self._models.move_to_end(key)
                return seg
            logger.info("building segmenter %s%s", method, f" + {vfm}" if vfm else "")
            seg = self._factory(method, vfm, weights)
            self._models[key] = seg
            while len(self._models) > self.size:
                old, _ = self._models.popitem(last=False)
                logger.info("dropping segmenter %s from the cache", old)
            return seg

    def __contains__(self, key) -> bool:
        return tuple(key) in self._models

    def __len__(self) -> int:
        return len(self._models)


def split_labels(text: Optional[str]) -> List[str]:
    """``"cat, sofa; couch"`` -> ``["cat", "sofa; couch"]`` (commas between labels, ``;`` between synonyms),
    validated by ovseg's label parser (empty, whitespace-only and duplicate labels raise)."""
    from .text import parse_labels

    if text is None or not str(text).strip():
        raise InvalidInputError(f"no labels given; type comma-separated labels, e.g. \"{EXAMPLE_LABELS}\"")
    items = [part.strip() for part in str(text).split(",")]
    parse_labels(items)  # raises with the bad label quoted
    return items


@dataclass
class DemoOutput:
    """What one prediction of the demo produced.

    Attributes:
        image: (H, W, 3) uint8 RGB input.
        label_map: (H, W) integer indices into ``labels``.
        labels: class names (first synonym of each label).
        overlay: (H, W, 3) uint8 colour mask over the image, every class coloured.
        legend: PIL image of the legend (labels present, colour, share).
        label_png: path of the label map as a palette PNG.
        results_json: path of the results JSON.
        results: the JSON's content.
    """

    image: np.ndarray
    label_map: np.ndarray
    labels: List[str]
    overlay: np.ndarray
    legend: Any
    label_png: str
    results_json: str
    results: Dict[str, Any]


def _as_rgb(image: Any) -> np.ndarray:
    """Gradio's numpy image (or a PIL image / path) -> (H, W, 3) uint8 RGB."""
    if image is None:
        raise InvalidInputError("no image given; upload or paste an image first")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    from .preprocess import load_image

    rgb = load_image(image)
    if not isinstance(rgb, np.ndarray):  # a float tensor in [0, 1]
        rgb = (rgb * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return rgb


def _settings(seg: Any, method: str, vfm: Optional[str], vfm_weights: Optional[str], threshold: float) -> Dict:
    """JSON-able settings that shaped a result: the demo's choices and the segmenter's own ``settings()``
    (every method option, weights with the CLIP activation and identity, templates, precision, ovseg version)."""
    full = seg.settings()
    out = {"method": method, "vfm": vfm, "vfm_weights": (vfm_weights or "official") if vfm else None,
           "threshold": threshold}
    out.update({k: v for k, v in full.items() if k != "method"})
    out["options"] = full["method"]
    return out


def run_prediction(
    cache: SegmenterCache,
    image: Any,
    labels_text: Optional[str],
    method: str,
    vfm: Optional[str] = None,
    threshold: Optional[float] = None,
    *,
    out_dir: str,
    progress: Optional[Callable[..., Any]] = None,
) -> DemoOutput:
    """Validate the inputs, segment ``image`` and write the label PNG and results JSON under ``out_dir``.

    Args:
        cache: where the segmenter for (method, VFM) comes from.
        image: (H, W, 3) uint8 RGB array (Gradio's), PIL image or path.
        labels_text: ``"cat, sofa; couch, floor"``.
        method: a method name; vfm: a VFM name for methods that use one (None: the preset's).
        threshold: in [0, 1]; None keeps the method's.
        out_dir: an existing folder for the two files.
        progress: ``progress(fraction, desc=...)`` (``gr.Progress``), optional.

    Raises:
        OvsegError (ValueError/TypeError/...): bad input, with ovseg's own message.
    """
    step = progress if progress is not None else (lambda *a, **k: None)  # (gr.Progress is falsy: it has a len)
    items = split_labels(labels_text)  # checked before the image and the model: the cheapest first
    rgb = _as_rgb(image)
    method, vfm, vfm_weights = cache.resolve(method, vfm)
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise InvalidInputError(f"threshold must be a number in [0, 1], got {threshold!r}")
        threshold = float(threshold)
    step(0.0, desc=f"loading {method}{' + ' + vfm if vfm else ''}")
    seg = cache.get(method, vfm)
    step(0.1, desc="segmenting")
    res = seg.predict(rgb, items, threshold=threshold, progress=progress is not None)
    step(0.9, desc="rendering")
    label_map = np.asarray(res.label_map)
    overlay = np.asarray(res.overlay(ALPHA).convert("RGB"))
    from .text import parse_labels

    labelset = parse_labels(items)
    used_threshold = threshold if threshold is not None else getattr(getattr(seg, "cfg", None), "threshold", None)
    results = {
        "labels": list(res.labels),
        "synonyms": {name: [q for q, c in zip(labelset.queries, labelset.query_class) if c == i]
                     for i, name in enumerate(labelset.names)},
        "fractions": {k: round(float(v), 6) for k, v in res.fractions().items()},
        "image": {"height": int(label_map.shape[0]), "width": int(label_map.shape[1])},
        "settings": _settings(seg, method, vfm, vfm_weights, used_threshold),
    }
    out = Path(out_dir)
    label_png, results_json = out / "ovseg_labels.png", out / "ovseg_results.json"
    res.label_image().save(label_png)
    results_json.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    return DemoOutput(image=rgb, label_map=label_map, labels=list(res.labels), overlay=overlay,
                      legend=res.legend(), label_png=str(label_png), results_json=str(results_json), results=results)


def render_overlay(image: np.ndarray, overlay: np.ndarray, label_map: np.ndarray, labels: Sequence[str],
                   shown: Optional[Sequence[str]]) -> np.ndarray:
    """The overlay with only the ``shown`` classes coloured; the others show the plain image.

    Args:
        image: (H, W, 3) uint8 input; overlay: (H, W, 3) uint8 with every class coloured;
        label_map: (H, W) indices into ``labels``; shown: names of the classes to colour (None: all).

    Returns:
        (H, W, 3) uint8.
    """
    if shown is None:
        return overlay
    unknown = [s for s in shown if s not in labels]
    if unknown:
        raise InvalidInputError(f"unknown classes {unknown}; this result has {list(labels)}")
    keep = np.isin(label_map, [labels.index(s) for s in shown])  # (H, W)
    return np.where(keep[..., None], overlay, image)


class _RunFiles:
    """A private temporary folder per app, made on first use and removed at exit; each prediction gets a
    subfolder, and only the last ``keep`` stay (Gradio copies returned files into its own cache)."""

    def __init__(self, keep: int = 16):
        self.root: Optional[str] = None
        self._runs: deque = deque()
        self._keep = keep
        self._lock = threading.Lock()

    def new(self) -> str:
        with self._lock:
            if self.root is None:
                self.root = tempfile.mkdtemp(prefix="ovseg-demo-")
                atexit.register(self.cleanup)
            path = os.path.join(self.root, uuid.uuid4().hex[:12])
            os.makedirs(path)
            self._runs.append(path)
            while len(self._runs) > self._keep:
                shutil.rmtree(self._runs.popleft(), ignore_errors=True)
        return path

    def cleanup(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _gradio():
    from ._deps import require

    return require("gradio", "demo", "ovseg demo")


def _user_error(gr, e: Exception):
    msg = " ".join(str(e).split()) or type(e).__name__
    return gr.Error(msg, print_exception=False)


def _private(gr) -> Dict[str, Any]:
    """Keyword that keeps a UI-only event out of the API page (Gradio 6 renamed it)."""
    major = int(gr.__version__.split(".")[0])
    return {"api_visibility": "private"} if major >= 6 else {"show_api": False}


def build_demo(
    *,
    method: str = "proxyclip",
    vfm: Optional[str] = None,
    clip: Optional[str] = None,
    clip_weights: Optional[str] = None,
    vfm_weights: Optional[str] = None,
    threshold: Optional[float] = None,
    factory: Optional[SegmenterFactory] = None,
    cache_size: int = 2,
    **segmenter_kwargs: Any,
):
    """The demo as a ``gr.Blocks`` app (not launched).

    Args:
        method: the method selected at start; vfm: the VFM selected at start (default: the method's preset).
        clip, clip_weights: the CLIP of every method (defaults: ``ViT-B-16``, ``openai``).
        vfm_weights: None (official weights), ``"random"``, or a file holding the weights of ``vfm`` (or of the
            method's preset VFM); other VFMs then use their official weights.
        threshold: the threshold slider's start value (default: the method's preset).
        factory: ``factory(method, vfm, vfm_weights) -> Segmenter`` instead of ``Segmenter(...)``; ``clip`` and
            ``clip_weights`` then only label the page and must name what the factory builds.
        cache_size: how many segmenters stay in memory.
        **segmenter_kwargs: passed to :class:`~ovseg.Segmenter` (``device``, ``precision``, ``clip_kwargs``,
            ``vfm_kwargs``, preset options such as ``window``); not with ``factory``.

    Returns:
        ``gr.Blocks``; its Run button is the named API endpoint ``/predict``.
    """
    preset_vfm = method_vfm(method)  # the user's mistakes first, then the missing package
    if vfm is not None and preset_vfm is None:
        raise InvalidInputError(f"method '{method}' uses no VFM, but vfm={vfm!r} was given")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InvalidInputError(f"threshold must be in [0, 1], got {threshold!r}")
    start_vfm = vfm or preset_vfm
    if factory is None:
        segmenter_kwargs = dict(clip=clip, clip_weights=clip_weights, **segmenter_kwargs)
    cache = SegmenterCache(factory, vfm_weights=vfm_weights,
                           weights_vfm=start_vfm if vfm_weights not in (None, "random") else None,
                           size=cache_size, **segmenter_kwargs)
    gr = _gradio()
    files = _RunFiles()
    start_threshold = threshold if threshold is not None else _preset_threshold(method)
    vfm_methods = [m for m in _method_names() if method_vfm(m) is not None]
    private = _private(gr)
    cli_vfm, cli_threshold = vfm, threshold  # the closures below use these names for their own parameters

    tracker = gr.Progress(track_tqdm=True)  # Gradio finds it as a default argument; tracks predict()'s tqdm bar

    def predict(image, labels, method, vfm, threshold, progress=tracker):  # the names the API shows
        try:
            items = split_labels(labels)
            if len(items) == 1:
                gr.Warning(f"only one label ({items[0]!r}): every pixel gets it; add more labels, e.g. the "
                           "background's")
            name = method.strip() if isinstance(method, str) else method
            if vfm and method_vfm(name) is None:
                gr.Warning(f"method '{name}' uses no VFM; the VFM choice {vfm!r} is ignored")
            out = run_prediction(cache, image, labels, method, vfm, threshold, out_dir=files.new(),
                                 progress=progress)
        except (OvsegError, ValueError, TypeError, ImportError) as e:
            raise _user_error(gr, e) from e
        state = {"image": out.image, "overlay": out.overlay, "label_map": out.label_map, "labels": out.labels,
                 "legend": out.legend}
        return out.overlay, out.label_png, out.results_json, state

    def show_classes(state):
        if not state:
            return gr.update(choices=[], value=[]), None
        present = [lab for lab in state["labels"] if (state["label_map"] == state["labels"].index(lab)).any()]
        return gr.update(choices=present, value=present), state["legend"]

    def toggle(state, shown):
        if not state:
            return None
        return render_overlay(state["image"], state["overlay"], state["label_map"], state["labels"], shown)

    def on_method(method_name):
        try:
            preset = method_vfm(method_name)
        except (OvsegError, ValueError, TypeError):
            return gr.update(), gr.update()
        if preset is None:
            vfm_update = gr.update(value=None, interactive=False)
        else:
            vfm_update = gr.update(value=cli_vfm or preset, interactive=True)
        thd_update = gr.update() if cli_threshold is not None else gr.update(value=_preset_threshold(method_name))
        return vfm_update, thd_update

    weights = _weights_note(clip, clip_weights, vfm_weights, start_vfm)
    with gr.Blocks(title="ovseg demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## ovseg {__version__}: open-vocabulary semantic segmentation\n{weights}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image (upload, or paste from the clipboard)", type="numpy", image_mode="RGB",
                                 sources=["upload", "clipboard"], height=360, elem_id="ovseg-image")
                labels = gr.Textbox(label="Labels", placeholder=EXAMPLE_LABELS, elem_id="ovseg-labels",
                                    info="commas between labels, ';' between synonyms of one label "
                                         "(the first names it)")
                with gr.Row():
                    method_dd = gr.Dropdown(_method_names(), value=method, label="Method", allow_custom_value=True,
                                            elem_id="ovseg-method")
                    vfm_dd = gr.Dropdown(_vfm_names(), value=start_vfm, label="VFM", allow_custom_value=True,
                                         interactive=preset_vfm is not None, elem_id="ovseg-vfm",
                                         info=f"only used by {', '.join(vfm_methods)}; other methods ignore it")
                thd = gr.Slider(0.0, 1.0, value=start_threshold, step=0.01, label="Threshold",
                                info="pixels whose best class probability is below it go to the first label "
                                     "(0 = off)", elem_id="ovseg-threshold")
                run = gr.Button("Run", variant="primary", elem_id="ovseg-run")
            with gr.Column():
                overlay = gr.Image(label="Overlay", type="numpy", format="png", interactive=False, height=360,
                                   elem_id="ovseg-overlay")
                legend = gr.Image(label="Legend", type="pil", format="png", interactive=False,
                                  elem_id="ovseg-legend", height=160)
                shown = gr.CheckboxGroup([], label="Classes shown", elem_id="ovseg-classes",
                                         info="untick a class to see the photo under it (no re-run)")
                with gr.Row():
                    label_png = gr.File(label="Label map (palette PNG)", elem_id="ovseg-label-png")
                    results_json = gr.File(label="Results (JSON)", elem_id="ovseg-results-json")
        state = gr.State()
        inputs = [image, labels, method_dd, vfm_dd, thd]
        outputs = [overlay, label_png, results_json, state]  # the State is not part of the API
        run.click(predict, inputs, outputs, api_name="predict", concurrency_limit=1, concurrency_id="predict"
                  ).success(show_classes, state, [shown, legend], **private)
        labels.submit(predict, inputs, outputs, concurrency_limit=1, concurrency_id="predict", **private
                      ).success(show_classes, state, [shown, legend], **private)
        shown.input(toggle, [state, shown], overlay, **private)
        method_dd.change(on_method, method_dd, [vfm_dd, thd], **private)
    app.ovseg_cache = cache  # for tests and for preloading
    app.ovseg_files = files
    return app


def _preset_threshold(method: str) -> float:
    from .methods import get_method

    return float(get_method(method).threshold)


def _weights_note(clip: Optional[str], clip_weights: Optional[str], vfm_weights: Optional[str],
                  start_vfm: Optional[str]) -> str:
    clip = clip or "ViT-B-16"
    clip_weights = clip_weights or "openai"
    if vfm_weights in (None, "random"):
        vfm_note = "official" if vfm_weights is None else "random"
    else:
        vfm_note = f"`{vfm_weights}` for {start_vfm}, official for the others"
    note = f"CLIP `{clip}` with weights `{clip_weights}`; VFM weights: {vfm_note}."
    if "random" in (clip_weights, vfm_weights):
        note += " **Random weights give meaningless labels (a smoke test).**"
    return note


def launch_demo(
    *,
    host: str = "127.0.0.1",
    port: Optional[int] = 7860,
    share: bool = False,
    preload: bool = True,
    **build_kwargs: Any,
) -> int:
    """Build and serve the demo until interrupted (``ovseg demo``).

    Args:
        host: the address to listen on (``0.0.0.0`` for every interface).
        port: the port (None: Gradio picks one from 7860 on).
        share: ask Gradio for a public ``*.gradio.live`` link (needs internet; off by default).
        preload: build the start method's segmenter before serving, so missing weights fail here.
        **build_kwargs: see :func:`build_demo`.
    """
    app = build_demo(**build_kwargs)
    try:
        if preload:
            method = build_kwargs.get("method", "proxyclip")
            print(f"ovseg demo: loading {method} (weights are downloaded on first use)...", file=sys.stderr)
            app.ovseg_cache.get(method, build_kwargs.get("vfm"))
        app.queue(default_concurrency_limit=1)
        app.launch(server_name=host, server_port=port, share=share, show_error=True)
    finally:
        app.ovseg_files.cleanup()
    return 0

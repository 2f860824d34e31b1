"""The examples stay in sync with the API: scripts compile, the notebook is valid and runs top to bottom
(here with seeded random weights of small configs instead of downloads)."""
import ast
import json
import py_compile
from pathlib import Path

import pytest

from .conftest import TINY_CLIP, TINY_DINO

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_scripts_compile(script):
    py_compile.compile(str(EXAMPLES / script), doraise=True)


def _code_cells():
    nb = json.loads((EXAMPLES / "ovseg_demo.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            yield "\n".join(ln for ln in src.splitlines() if not ln.lstrip().startswith(("%", "!")))


def test_notebook_is_valid_nbformat():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(str(EXAMPLES / "ovseg_demo.ipynb"), as_version=4)
    nbformat.validate(nb)
    for src in _code_cells():
        ast.parse(src)


def test_notebook_runs_top_to_bottom_with_random_weights(tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    import ovseg

    real = ovseg.Segmenter

    def fake(method="proxyclip", **kw):  # same call, random small weights instead of downloads
        kw.update(clip_weights="random", clip_kwargs=TINY_CLIP, templates="single")
        if method == "proxyclip":
            kw.update(vfm_weights="random", vfm_kwargs={"model_kwargs": TINY_DINO})
        return real(method, **kw)

    monkeypatch.setattr(ovseg, "Segmenter", fake)
    monkeypatch.chdir(tmp_path)
    ns = {}
    last = None
    for src in _code_cells():
        tree = ast.parse(src)
        if tree.body and isinstance(tree.body[-1], ast.Expr):  # evaluate the last expression like Jupyter does
            exec(compile(ast.Module(tree.body[:-1], []), "<cell>", "exec"), ns)
            last = eval(compile(ast.Expression(tree.body[-1].value), "<cell>", "eval"), ns)
            if hasattr(last, "_repr_png_"):
                assert last._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            exec(compile(tree, "<cell>", "exec"), ns)
    assert (tmp_path / "out_notebook" / "chelsea_overlay.png").exists()

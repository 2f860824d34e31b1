"""Every command in the README, docs/*.md and the examples' docstrings runs as written.

Commands are the lines (and inline code spans of more than two words) that start with ``ovseg``, ``python -m ovseg`` or
``python examples/...`` (also as one step of a ``&&`` chain; ``pip install`` and the like are not run). Each runs
in-process in a temporary folder:

- files it names are made up first: images (``photo.jpg``), folders of images (``photos/``), a match for each
  glob (``"shots/**/*.jpg"``), ``--labels-file`` and ``--templates`` files;
- ``ovseg.segmenter.Segmenter`` is replaced by the same class built with seeded random weights of small configs
  of the same architectures (no download, a second or so per command);
- a command whose text carries ``# needs: <what>`` (a dataset, real weights, several machines) is skipped with
  that reason. A placeholder such as ``...`` or a path outside the temporary folder without that marker fails
  with a message saying how to fix the doc.

To cover a new kind of command, extend ``PREFIXES`` (what is run) or ``make_inputs`` (what is made up).
"""
from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional

import numpy as np
import pytest
from PIL import Image

from .conftest import TINY_CLIP, TINY_CLIP_CORRCLIP, tiny_vfm_kwargs

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*.py"))]
PREFIXES = ("ovseg ", "python -m ovseg", "python examples/", "torchrun ")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
NEEDS = re.compile(r"#\s*needs:\s*(?P<what>.+)$")


class DocCommand(NamedTuple):
    source: str  # "docs/cli.md:12"
    text: str  # the command as written (one step of a && chain)
    needs: Optional[str]  # the reason of a "# needs: ..." marker

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


def _shell_lines(path: Path) -> Iterator[tuple]:
    """(line number, text) of shell lines: fenced bash/sh/console blocks, inline `code` spans, docstring lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".py":
        doc = re.match(r'\s*(?:"""|\'\'\')(.*?)(?:"""|\'\'\')', path.read_text(encoding="utf-8"), re.S)
        n_doc = doc.group(0).count("\n") + 1 if doc else 0
        for i, line in enumerate(lines[:n_doc], start=1):
            yield i, re.sub(r"^.*?\bRun:\s*", "", line.strip().strip('"'))
        return
    fence = None
    for i, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip() or "text"
            continue
        if fence is not None:
            if fence in ("bash", "sh", "shell", "console"):
                yield i, stripped.lstrip("$ ")
            continue
        for span in re.findall(r"`([^`]+)`", line):
            if len(span.split()) > 2:  # `ovseg predict` alone names a subcommand in prose; it is not a command
                yield i, span.strip()


def collect() -> List[DocCommand]:
    found = []
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        for lineno, line in _shell_lines(path):
            marker = NEEDS.search(line)
            for step in line.split("&&"):
                step = re.sub(r"^python3\b", "python", step.strip())
                if step.startswith(PREFIXES):
                    found.append(DocCommand(f"{rel}:{lineno}", step, marker.group("what").strip() if marker else None))
    return found


COMMANDS = collect()


def test_the_docs_have_commands_to_test():
    texts = [c.text for c in COMMANDS]
    assert any(t.startswith("ovseg predict") for t in texts) and any("examples/quickstart.py" in t for t in texts)


def _builtin_vfms() -> frozenset:
    from ovseg.backbones import list_vfms

    return frozenset(list_vfms())


_BUILTIN_VFMS = _builtin_vfms()  # before any example registers its own


def _tiny_segmenter_factory(real):
    """The Segmenter, built with seeded random weights of small configs of the same architectures."""
    def build(method: str = "proxyclip", **kw):
        from ovseg.methods import get_method

        kw["clip_weights"] = "random"
        corrclip = get_method(method).strategy == "corrclip"  # its spatial branch needs 6 blocks
        kw["clip_kwargs"] = TINY_CLIP_CORRCLIP if corrclip else TINY_CLIP
        roles = get_method(method).replace(vfm=kw.get("vfm"), vfms=kw.get("vfms")).vfm_names()
        if roles:  # every VFM role of the method: random weights of a small config of the same architecture
            kw["vfm_weights"] = {role: "random" for role in roles}
            # ovseg's own VFMs get small configs; one an example registers keeps its own builder's arguments
            kw["vfm_kwargs"] = {role: {"model_kwargs": tiny_vfm_kwargs(name)} for role, name in roles.items()
                                if name in _BUILTIN_VFMS}
        return real(method, **kw)

    return build


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    img = np.zeros((48, 64, 3), np.uint8)
    img[:24], img[24:] = rng.randint(0, 255, 3), rng.randint(0, 255, 3)
    Image.fromarray(img).save(path)


def make_inputs(argv: List[str], where: str) -> None:
    """Create the files a command reads (relative paths only: the command runs in a temporary folder)."""
    def local(token: str) -> Path:
        p = Path(token)
        if p.is_absolute() or token.startswith("~") or ".." in p.parts:
            pytest.fail(f"{where}: '{token}' is outside the working folder; use a relative path or mark the "
                        "command '# needs: <what it needs>'")
        return p

    positional = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("--labels-file",):
            local(argv[i + 1]).write_text("sky\ngrass; lawn\n# a comment\ntree\n", encoding="utf-8")
            i += 2
            continue
        if tok == "--templates" and argv[i + 1].endswith(".txt"):
            local(argv[i + 1]).write_text("a photo of a {}.\n", encoding="utf-8")
            i += 2
            continue
        if tok == "--image":
            _image(local(argv[i + 1]))
            i += 2
            continue
        if tok.startswith("--"):
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") and tok not in _FLAGS else 1
            continue
        positional.append(tok)
        i += 1
    if argv[:1] == ["predict"]:
        for tok in positional[1:] if positional[:1] == ["predict"] else positional:
            if any(ch in tok for ch in "*?["):
                _image(local(tok.replace("**/", "sub/").replace("*", "x").replace("?", "x")))
            elif Path(tok).suffix.lower() in IMAGE_SUFFIXES:
                _image(local(tok))
            else:  # a folder
                _image(local(tok) / "one.jpg", 1)
                _image(local(tok) / "two.png", 2)
        if "--masks" in argv:  # a region map <stem>.npz (CorrCLIP's layout) for every image made above
            folder = local(argv[argv.index("--masks") + 1])
            folder.mkdir(parents=True, exist_ok=True)
            for img in Path(".").rglob("*"):
                if img.suffix.lower() in IMAGE_SUFFIXES and folder not in img.parents:
                    regions = np.zeros((48, 64), np.int64)
                    regions[24:, 32:] = 1
                    np.savez(folder / f"{img.stem}.npz", instance_mask=regions)


def _option(args: List[str], name: str, default):
    return type(default)(args[args.index(name) + 1]) if name in args else default


def _no_serving(args: List[str], monkeypatch) -> Optional[list]:
    """For ``ovseg demo``: Gradio's ``launch`` records its arguments instead of serving (the browser test in
    tests/test_demo.py serves and drives the page). Returns the list the calls are recorded in, else None."""
    if args[:1] != ["demo"]:
        return None
    gr = pytest.importorskip("gradio", reason="the demo needs gradio (pip install 'ovseg[demo]')")
    calls: list = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append(kw))
    return calls


_FLAGS = {"--save-probs", "--recursive", "--quiet", "--random", "--resume", "--strict-ignore", "--share"}


def _argv(cmd: DocCommand) -> List[str]:
    text = NEEDS.sub("", cmd.text)
    if re.search(r"(^|\s)\.\.\.(\s|$)", text):
        pytest.fail(f"{cmd}: '...' is a placeholder; write a full command or mark it '# needs: <what>'")
    try:
        return shlex.split(text, comments=True)
    except ValueError as e:
        pytest.fail(f"{cmd}: not a valid shell command ({e})")


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.source for c in COMMANDS])
def test_doc_command_runs(cmd: DocCommand, tmp_path, monkeypatch, capsys):
    if cmd.needs:
        pytest.skip(f"needs {cmd.needs}")
    argv = _argv(cmd)
    if argv[0] == "torchrun":
        pytest.fail(f"{cmd}: torchrun commands are not run by this test; mark it '# needs: <what>'")
    import ovseg
    import ovseg.segmenter
    from ovseg.backbones import VFMS

    monkeypatch.setattr(VFMS, "_entries", dict(VFMS._entries))  # an example's register_vfm() stays local
    tiny = _tiny_segmenter_factory(ovseg.segmenter.Segmenter)
    monkeypatch.setattr(ovseg.segmenter, "Segmenter", tiny)
    monkeypatch.setattr(ovseg, "Segmenter", tiny)
    monkeypatch.chdir(tmp_path)
    if argv[0] == "ovseg" or argv[:3] == ["python", "-m", "ovseg"]:
        from ovseg.cli import main

        args = argv[1:] if argv[0] == "ovseg" else argv[3:]
        make_inputs(args, str(cmd))
        served = _no_serving(args, monkeypatch)
        code = main(args)
        err = capsys.readouterr().err
        assert code == 0, f"{cmd}\nexit code {code}; stderr:\n{err[-2000:]}"
        if served is not None:  # the demo built its page, loaded the start method and asked to serve it
            assert served and served[0]["server_port"] == _option(args, "--port", 7860), (cmd, served)
    elif argv[0] == "python" and argv[1].startswith("examples/"):
        make_inputs(argv[2:], str(cmd))
        monkeypatch.setattr(sys, "argv", [str(ROOT / argv[1]), *argv[2:]])
        try:
            runpy.run_path(str(ROOT / argv[1]), run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), f"{cmd}\nexit code {e.code}\n{capsys.readouterr().err[-2000:]}"
    else:  # pragma: no cover - PREFIXES and this dispatch must agree
        pytest.fail(f"{cmd}: no runner for this kind of command; extend test_doc_commands.py")

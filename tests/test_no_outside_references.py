"""The package and its docs cite only what ships with the repository (docs/, the papers), not notes outside it."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_references_to_files_outside_the_repository():
    offenders = []
    for folder in ("src", "docs", "examples", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in {".py", ".md", ".ipynb", ".txt", ".toml"} or path.name == Path(__file__).name:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for needle in ("METHODS_SPEC", "shared/seeds", "specs2025"):
                if needle in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not offenders, offenders

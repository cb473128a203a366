"""The documentation's code runs: every ```python block of README.md and the guides in docs/;
and their links lead to files that exist.

Blocks of one file run in order in one shared namespace (a later block may use names an
earlier one defined), inside a temporary working directory so files they write go nowhere.
A block preceded by the comment `<!-- no-test -->` is skipped (only for code that cannot run
here, e.g. a multi-hour training command).
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# README and every guide in docs/ (a block that cannot run here carries the no-test marker).
DOCUMENTS = ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
LINKED = DOCUMENTS + ["CONTRIBUTING.md"]

# An optional no-test marker on the line(s) before the fence, the fence, the code, the end fence.
_BLOCK = re.compile(r"(?P<marker><!--\s*no-test\s*-->[ \t]*\n[ \t]*\n?)?^```python[^\n]*\n(?P<code>.*?)^```",
                    re.S | re.M)


def python_blocks(text):
    """[(line number of the first code line, code, skipped)] for every ```python block."""
    blocks = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        blocks.append((line, m.group("code"), m.group("marker") is not None))
    return blocks


def test_block_extraction():
    text = ("intro\n```python\nx = 1\n```\ntext\n<!-- no-test -->\n```python\nraise SystemExit\n```\n"
            "```bash\nls\n```\n```python\ny = x + 1\n```\n")
    assert python_blocks(text) == [(3, "x = 1\n", False), (8, "raise SystemExit\n", True),
                                   (14, "y = x + 1\n", False)]


# The target of a Markdown link or image, `[text](target)`, without a `#section` part.
_LINK = re.compile(r"\]\((?P<target>[^)#\s]+)")


def test_link_extraction():
    text = "see [the tour](docs/TOUR.md), ![a plot](images/p.png) and [it](https://x.org/a#b)"
    assert [m.group("target") for m in _LINK.finditer(text)] == [
        "docs/TOUR.md", "images/p.png", "https://x.org/a"]


@pytest.mark.parametrize("name", LINKED)
def test_relative_links_lead_to_files(name):
    path = ROOT / name
    targets = [m.group("target") for m in _LINK.finditer(path.read_text(encoding="utf-8"))]
    missing = [t for t in targets if "://" not in t and not (path.parent / t).exists()]
    assert not missing, f"{name} links to files that do not exist: {missing}"


@pytest.mark.parametrize("name", DOCUMENTS)
def test_python_blocks_run(name, tmp_path, monkeypatch):
    path = ROOT / name
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    if name == "docs/TOUR.md":
        assert sum(not skipped for _, _, skipped in blocks) >= 5, "the tour should show runnable code"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": f"doc:{name}"}
    for line, code, skipped in blocks:
        if skipped:
            continue
        # Pad with newlines so tracebacks show the line numbers of the Markdown file.
        compiled = compile("\n" * (line - 1) + code, str(path), "exec")
        try:
            exec(compiled, namespace)
        except Exception as exc:  # report which block failed, with the error
            pytest.fail(f"{name}: the python block starting at line {line} raised "
                        f"{type(exc).__name__}: {exc}")

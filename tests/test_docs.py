"""The documentation stays complete: every public object in the API reference, every example in
the gallery with a title and one torch thread. (The build itself, with the examples executed,
is `make -C docs html`, run by CI.)"""

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"

PUBLIC_MODULES = [
    "volsk.scoring",
    "volsk.skorch",
    "volsk.sweep",
    "volsk.measures",
    "volsk.priors",
    "volsk.preconditioners",
    "volsk.costs",
    "volsk.results",
    "volsk.plot",
    "volsk.experiments.digits",
    "volsk.cli",
]


def documented_names():
    """{module: set of names} listed in the autosummary tables of docs/api.rst."""
    names, module = {}, None
    in_table = False
    for line in (DOCS / "api.rst").read_text().splitlines():
        found = re.match(r"\.\. currentmodule:: (\S+)", line)
        if found:
            module = found.group(1)
            continue
        if line.startswith(".. autosummary::"):
            in_table = True
            continue
        if in_table:
            entry = line.strip()
            if not line.startswith("   ") and entry:
                in_table = False
            elif entry and not entry.startswith(":"):
                names.setdefault(module, set()).add(entry)
    return names


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_is_in_the_api_reference(module_name):
    module = importlib.import_module(module_name)
    listed = documented_names().get(module_name, set())
    missing = sorted(set(module.__all__) - listed)
    assert not missing, f"add {missing} to docs/api.rst under {module_name}"


def test_top_level_exports_are_documented_somewhere():
    import volsk

    everywhere = set().union(*documented_names().values())
    missing = sorted(set(volsk.__all__) - everywhere - {"__version__"})
    assert not missing, f"add {missing} to docs/api.rst"


def example_files():
    return sorted(EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_example_is_a_gallery_script(path):
    source = path.read_text()
    doc = ast.get_docstring(ast.parse(source), clean=False)
    assert source.startswith('"""\n') and doc, "a sphinx-gallery example opens with a docstring"
    title, underline = doc.strip("\n").splitlines()[:2]
    assert re.fullmatch(r"=+", underline) and len(underline) >= len(title), (
        "the docstring's first line is the title, underlined with '=' at least as long"
    )
    assert "torch.set_num_threads(1)" in source


def test_gallery_order_names_every_example():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from gallery_order import ORDER
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    assert sorted(ORDER) == sorted(p.name for p in example_files())


def test_docstring_bars_are_escaped_outside_literals_and_math():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from volsk_docstrings import escape_bars
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    lines = [
        "weight w = |P g|^{-n}, kept ``|x|`` and `|y|` and :math:`|z|`",
        "Formula::",
        "",
        "    |S^{n-1}| I(u)",
        "",
        ">>> abs(-1) == |1|",
        ".. math::",
        "",
        "   \\|x\\|",
        "after |h|",
    ]
    assert escape_bars(list(lines)) == [
        "weight w = \\|P g\\|^{-n}, kept ``|x|`` and `|y|` and :math:`|z|`",
        *lines[1:9],
        "after \\|h\\|",
    ]

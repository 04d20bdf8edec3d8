"""The documentation stays complete and true: every public object in the API reference, every
example in the gallery with a title and one torch thread, every ``>>>`` snippet in the pages
run and printing what the page says. (The build itself, with the examples executed, is
`make -C docs html`, run by CI.)"""

import ast
import doctest
import importlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"

PUBLIC_MODULES = [
    "volsk.integrations",
    "volsk.skorch",
    "volsk.sweeps",
    "volsk.measures",
    "volsk.priors",
    "volsk.preconditioners",
    "volsk.costs",
    "volsk.results",
    "volsk.plot",
    "volsk.experiments.digits",
    "volsk.experiments.language",
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


# -- the pages' snippets run, and print what the pages say -------------------------------------

#: a number as printed: 12,194 | -8452.01 | 1e-3 (a comma only between groups of three digits)
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
GENERATED = {"_build", "generated", "auto_examples", "gen_modules"}


class NumbersToTenthOfAPercent(doctest.OutputChecker):
    """Doctest's comparison, except that numbers need only agree to 0.1% (relative).

    A page's numbers come from a run of its snippet; the tolerance keeps them checked to
    their magnitude and first three digits while a change in the last printed digit (a
    different CPU, a refactoring's rounding) does not fail the page.
    """

    def check_output(self, want, got, optionflags):
        if super().check_output(want, got, optionflags):
            return True
        wanted, printed = NUMBER.findall(want), NUMBER.findall(got)
        if len(wanted) != len(printed):
            return False
        if not super().check_output(NUMBER.sub("0", want), NUMBER.sub("0", got), optionflags):
            return False
        return all(math.isclose(float(w.replace(",", "")), float(g.replace(",", "")),
                                rel_tol=1e-3)
                   for w, g in zip(wanted, printed))


def doctested_pages():
    """The hand-written pages under docs/ with ``>>>`` snippets."""
    return sorted(p for p in DOCS.rglob("*.rst")
                  if not GENERATED & set(p.relative_to(DOCS).parts) and ">>>" in p.read_text())


def test_the_getting_started_snippet_is_doctested():
    assert DOCS / "getting_started.rst" in doctested_pages()


@pytest.mark.parametrize("page", doctested_pages(), ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_snippets_run_and_print_what_the_page_says(page):
    test = doctest.DocTestParser().get_doctest(page.read_text(), {"__name__": page.stem},
                                               page.name, str(page), 0)
    runner = doctest.DocTestRunner(checker=NumbersToTenthOfAPercent(),
                                   optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    threads = torch.get_num_threads()
    try:
        result = runner.run(test, out=report.append, clear_globs=True)
    finally:
        torch.set_num_threads(threads)  # snippets set one thread, as a reader would
    assert result.failed == 0, "".join(report)


@pytest.mark.parametrize("want, got, ok", [
    ("-8,452 nats, 12,194 bits", "-8,452 nats, 12,194 bits", True),
    ("-8,452 nats, 12,194 bits", "-8,455 nats, 12,198 bits", True),    # within 0.1%
    ("-8,452 nats, 12,194 bits", "-8,153 nats, 12,194 bits", False),   # the page drifted
    ("-8,452 nats, 12,194 bits", "-8,452 nats, 12,194 bytes", False),  # text is exact
    ("(200, 8)", "(200, 9)", False),
    ("0.001", "1e-3", True),
])
def test_page_numbers_are_checked_to_a_tenth_of_a_percent(want, got, ok):
    checker = NumbersToTenthOfAPercent()
    assert checker.check_output(want + "\n", got + "\n", doctest.ELLIPSIS) is ok

"""Docstring handling for the volsk docs.

Let docstrings write absolute values and norms as ``|x|``, as the paper and DESIGN do.

reStructuredText reads ``|P g|`` as a substitution reference and fails the build. This
extension escapes such bars in docstrings before they are parsed — outside inline literals
(double backticks), interpreted text (single backticks), doctest blocks, literal blocks (after
``::``) and directive bodies (``.. math::``, ``.. code-block::``), where a bar is already safe
or where a backslash would change the meaning.
"""

import re

# ``literal``, `interpreted` (with an optional :role: prefix): left untouched
_PROTECTED = re.compile(r"(``.+?``|(?::[\w.+-]+:)?`[^`]+`_{0,2})")
_BAR = re.compile(r"(?<!\\)\|")


def _indent(line):
    return len(line) - len(line.lstrip())


def escape_bars(lines):
    """Escape bare ``|`` in a docstring given as a list of lines, in place."""
    block_indent = None  # indentation of the line that opened a literal/directive block
    in_doctest = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if block_indent is not None:
            if not stripped or _indent(line) > block_indent:
                continue
            block_indent = None
        if in_doctest:
            if stripped:
                continue
            in_doctest = False
        if stripped.startswith(">>>"):
            in_doctest = True
            continue
        if stripped.startswith(".. ") or stripped.endswith("::"):
            block_indent = _indent(line)
            # the directive's own line may still carry text (e.g. ".. note:: |x|"): leave it
            continue
        if "|" not in line:
            continue
        parts = _PROTECTED.split(line)
        lines[i] = "".join(p if k % 2 else _BAR.sub(r"\\|", p) for k, p in enumerate(parts))
    return lines


def _process(app, what, name, obj, options, lines):
    escape_bars(lines)


_METADATA_ROUTING = re.compile(r"set_\w+_request")


def _skip(app, what, name, obj, skip, options):
    """Leave out scikit-learn's generated ``set_{method}_request`` methods: their docstrings
    point into scikit-learn's own documentation, and some Sphinx versions list them."""
    if _METADATA_ROUTING.fullmatch(name):
        return True
    return None


def setup(app):
    # after numpydoc (priority 500) has turned the sections into reStructuredText
    app.connect("autodoc-process-docstring", _process, priority=600)
    app.connect("autodoc-skip-member", _skip)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""Sphinx configuration for the volsk documentation.

Build (warnings are errors, the gallery is executed)::

    make -C docs html        # or: python -m sphinx -W --keep-going -b html docs docs/_build/html

Nothing here downloads anything: no intersphinx inventories, no remote images. MathJax is
loaded by the reader's browser from its CDN; set ``VOLSK_DOCS_MATHJAX`` to a local
``tex-chtml.js`` to read the pages offline.
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))  # gallery_order, volsk_docstrings

# Examples must never reach a model hub; they build every model from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import volsk  # noqa: E402

project = "volsk"
author = "the volsk developers"
copyright = "the volsk developers"  # noqa: A001 - Sphinx's name
release = volsk.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
    "volsk_docstrings",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "auto_examples/*.ipynb",
                    "auto_examples/*.py", "auto_examples/*.zip"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
default_role = "literal"  # `x` in prose renders as code, never as a dangling reference
pygments_style = "sphinx"
highlight_language = "text"  # untagged blocks (the benchmark tables) are not Python

# -- autodoc / autosummary / numpydoc ---------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_typehints = "none"  # types are in the numpydoc sections
numpydoc_show_class_members = False  # the class template lists members itself
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_attributes_as_param_list = True

# -- math ---------------------------------------------------------------------------------------
if os.environ.get("VOLSK_DOCS_MATHJAX"):
    mathjax_path = os.environ["VOLSK_DOCS_MATHJAX"]

# -- MyST (the benchmarks page includes benchmarks/RESULTS.md) ----------------------------------
myst_heading_anchors = 0
suppress_warnings = ["myst.header"]  # RESULTS.md starts its sections at level 2

# -- sphinx-gallery -------------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"\.py$",  # execute every example, not only plot_*.py
    "ignore_pattern": r"__init__\.py",
    "within_subsection_order": "gallery_order.ExampleOrder",
    "reset_modules": ("matplotlib", "gallery_order.one_torch_thread"),
    "doc_module": ("volsk",),
    "backreferences_dir": "gen_modules/backreferences",
    "remove_config_comments": True,
    "show_memory": False,
    "write_computation_times": True,  # the examples page links it, even under SOURCE_DATE_EPOCH
    "capture_repr": ("_repr_html_", "__repr__"),
    "ignore_repr_types": r"matplotlib[\w.]*",  # a cell ending in ax.set_title(...) shows no Text
    "matplotlib_animations": False,
    "image_srcset": [],
    "download_all_examples": False,
    "plot_gallery": "True",
}

# -- HTML ------------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"volsk {release}"
html_static_path = ["_static"]
html_css_files = ["volsk.css"]
html_show_sourcelink = False
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
    "secondary_sidebar_items": ["page-toc", "sg_download_links"],
}
# no left sidebar where the content needs the width (code of up to 100 columns, wide tables)
html_sidebars = {"index": [], "getting_started": [], "changelog": [], "benchmarks": [],
                 "auto_examples/*": []}
html_context = {"default_mode": "light"}

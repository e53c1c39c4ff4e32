"""Sphinx configuration of the cpsl-ops documentation.

Build (what ``.ci/docs.sh`` runs, warnings are errors)::

    pip install -r docs/requirements.txt
    sphinx-build -W --keep-going -b html docs build/docs/html
    sphinx-build -W --keep-going -b doctest docs build/docs/doctest

The API pages document the *installed* ``cpsl_ops`` (this file does not put the checkout on
``sys.path``: a checkout without a built extension would shadow the installed package).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cpsl_ops

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent

project = "cpsl-ops"
author = "cpsl-ops contributors"
copyright = "cpsl-ops contributors (MIT licence)"
release = cpsl_ops.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings use Google style (Args:, Returns:, Raises:)
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "myst_parser",  # only to include benchmarks/results/README.md (Markdown) as it is
]

source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "examples"]
templates_path: list[str] = []

# -- autodoc / napoleon --------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- MyST (the benchmark results are Markdown) ---------------------------------------------------
myst_enable_extensions: list[str] = []
myst_heading_anchors = 3

# -- doctest -------------------------------------------------------------------------------------
# Every block runs on the CPU with small tensors; the blocks that need a GPU say so with :skipif:.
doctest_global_setup = f"""
import os
import sys
import torch
import cpsl_ops
DOCS_DIR = {str(DOCS)!r}
REPO_DIR = {str(REPO)!r}
if os.path.join(REPO_DIR, "examples") not in sys.path:
    sys.path.insert(0, os.path.join(REPO_DIR, "examples"))  # the example trainer's package
_ = torch.manual_seed(0)
"""
doctest_test_doctest_blocks = "default"  # plain >>> blocks are tests too

# -- HTML ----------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"cpsl-ops {release}"
html_static_path: list[str] = []
html_show_sourcelink = True

"""Sphinx configuration of the pyro_linconstr documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html``. The tutorials in
``../tutorials`` are executed by sphinx-gallery in smoke mode (``PLC_SMOKE=1``,
about two minutes each) unless ``PLC_SMOKE`` is already set; export
``PLC_SMOKE=0`` before building to render the full-mode results instead. The
accepted values (``1/true/yes/on``, ``0/false/no/off``) are those of every
tutorial: see ``tutorials/GALLERY_HEADER.rst``.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs"))  # gallery_reset
os.environ.setdefault("PLC_SMOKE", "1")  # smoke mode unless the caller chose
os.environ.setdefault("MPLBACKEND", "Agg")

import pyro_linconstr  # noqa: E402

project = "pyro_linconstr"
author = "the pyro_linconstr developers"
copyright = "2026, " + author
version = release = pyro_linconstr.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "matplotlib.sphinxext.plot_directive",
    "sphinx_gallery.gen_gallery",
]

exclude_patterns = ["_build", "auto_tutorials/*.ipynb", "auto_tutorials/*.py"]
templates_path = []
html_theme = "alabaster"
html_static_path = []
html_theme_options = {"description": "Pyro distributions conditioned on A x = b"}

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "none"
# Docstrings are reST with ``:param type name:`` fields and an ``Example::`` doctest block.
napoleon_google_docstring = False
napoleon_numpy_docstring = False

# Offline machines: no intersphinx inventories are fetched.
intersphinx_mapping = {}

# Cross references to torch / pyro types cannot be resolved offline; do not fail on them.
nitpicky = False

plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]

sphinx_gallery_conf = {
    "examples_dirs": ["../tutorials"],
    "gallery_dirs": ["auto_tutorials"],
    # Run every tutorial (smoke mode comes from PLC_SMOKE above); PLC_GALLERY_PATTERN
    # (a regex on the path) runs a subset while editing, the others are shown unexecuted.
    "filename_pattern": os.environ.get("PLC_GALLERY_PATTERN", r".*\.py$"),
    "ignore_pattern": r"(__init__|conftest)\.py$",
    "within_subsection_order": "FileNameSortKey",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "image_scrapers": ("matplotlib",),
    # Tutorials share one process: reset matplotlib and torch/pyro globals around each.
    "reset_modules": ("matplotlib", "gallery_reset.reset_torch"),
    "reset_modules_order": "both",
    "min_reported_time": 0,
}

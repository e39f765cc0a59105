"""Sphinx configuration for the heksher_shm documentation.

Built in CI with warnings as errors, as HTML and as doctests:

    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W --keep-going -b doctest docs docs/_build/doctest

Nothing here fetches from the network (no intersphinx).
"""

from __future__ import annotations

import doctest
import os
import sys

# Import the package from this checkout even when it is not installed.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from heksher_shm import __version__

project = "heksher_shm"
author = "heksher_shm developers"
copyright = "heksher_shm developers, MIT license"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    # The package's docstrings use Google style ("Args:", "Raises:").
    "sphinx.ext.napoleon",
]

# _build is the output; _generated holds files that other pages include (the
# benchmarks table) and that must not be read as documents of their own.
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]

root_doc = "index"
language = "en"
pygments_style = "sphinx"
pygments_dark_style = "monokai"

html_theme = "furo"
html_title = f"heksher_shm {release}"
html_static_path = ["_static"]
html_css_files = ["heksher_shm.css"]

# -- autodoc ----------------------------------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Off: it would rewrite the signatures of the live objects, which the examples inspect.
autodoc_preserve_defaults = False
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections become fields of the class, not separate attribute
# entries that would collide with the members autodoc documents.
napoleon_use_ivar = True

# -- doctest ----------------------------------------------------------------------------------------
#
# Every group of examples on every page runs against its own in-memory Heksher
# service (``service``) and its own private folder for the shared cache, so
# examples cannot see each other's settings, main client or segments.

# Exception messages are part of what the examples show, so they are compared
# too (Sphinx ignores them by default with IGNORE_EXCEPTION_DETAIL).
doctest_default_flags = doctest.ELLIPSIS | doctest.DONT_ACCEPT_TRUE_FOR_1

doctest_global_setup = """
import asyncio
import logging
import os
import shutil
import tempfile

import heksher_shm
from heksher_shm._process import main as _heksher_main
from heksher_shm.testing import HeksherService

# The examples show values, not log lines: keep warnings off stderr.
_heksher_logger = logging.getLogger("heksher_shm")
if not any(isinstance(h, logging.NullHandler) for h in _heksher_logger.handlers):
    _heksher_logger.addHandler(logging.NullHandler())

_heksher_main.reset()
_docs_shm_dir = tempfile.mkdtemp(prefix="heksher-shm-docs-")
_docs_saved_env = os.environ.get("HEKSHER_SHM_DIR")
os.environ["HEKSHER_SHM_DIR"] = _docs_shm_dir
service = HeksherService(context_features=["user", "theme", "environment"]).start()
"""

doctest_global_cleanup = """
service.stop()
_heksher_main.reset()
if _docs_saved_env is None:
    os.environ.pop("HEKSHER_SHM_DIR", None)
else:
    os.environ["HEKSHER_SHM_DIR"] = _docs_saved_env
shutil.rmtree(_docs_shm_dir, ignore_errors=True)
"""

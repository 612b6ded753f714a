"""Sphinx configuration for sinkhorn-ot.

Build:   python -m sphinx -W -b html docs docs/_build/html
Doctest: python -m sphinx -b doctest docs docs/_build/doctest
"""
import importlib.util
import inspect
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Document the installed package (it carries the compiled core); fall back to the source tree
# only when nothing is installed, e.g. to build the pages of a checkout without a compiler.
try:
    import sinkhorn_ot._core  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

import sinkhorn_ot  # noqa: E402

project = "sinkhorn-ot"
author = "the sinkhorn-ot developers"
copyright = "the sinkhorn-ot developers"
release = sinkhorn_ot.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "numpydoc",
]

exclude_patterns = ["_build", "_generated/*.rst"]  # _generated/ is included, not a page
templates_path = []
html_theme = "alabaster"
html_theme_options = {"page_width": "1100px", "sidebar_width": "220px"}
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# MathJax served with the pages, not from a CDN: the pages render their math offline.  The
# files come from the ``sphinx-mathjax-offline`` package (MathJax 3, in the ``docs`` extra);
# only the TeX-to-HTML component and its fonts are copied into the build.
_MATHJAX_PKG = "sphinx-mathjax-offline"
mathjax_path = "mathjax/tex-chtml.js"

autodoc_member_order = "bysource"
autodoc_typehints = "none"          # the numpydoc "Parameters" sections carry the types
numpydoc_show_class_members = False  # dataclass fields are documented under Attributes
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
intersphinx_mapping = {}             # no network at build time

# Run the docstring and page examples in a plain namespace.
doctest_global_setup = "import numpy as np\nimport sinkhorn_ot"


def _write_api_listing():
    """The API reference follows ``sinkhorn_ot.__all__`` at build time, so functions added
    to the package (and to ``__all__``) appear without editing the docs."""
    funcs, classes, data = [], [], []
    for name in sinkhorn_ot.__all__:
        obj = getattr(sinkhorn_ot, name)
        if inspect.isclass(obj):
            classes.append(name)
        elif callable(obj):
            funcs.append(name)
        else:
            data.append(name)
    out = ["Functions", "---------", ""]
    out += [f".. autofunction:: sinkhorn_ot.{n}\n" for n in funcs]
    out += ["Result types", "------------", ""]
    out += [f".. autoclass:: sinkhorn_ot.{n}\n   :members:\n" for n in classes]
    if data:
        out += ["Constants", "---------", ""]
        for n in data:
            out += [f".. py:data:: sinkhorn_ot.{n}", f"   :value: {getattr(sinkhorn_ot, n)!r}", ""]
            out += [f"   {line}" for line in _constant_doc(n)] + [""]
    target = HERE / "_generated" / "api_listing.rst"
    target.parent.mkdir(exist_ok=True)
    text = "\n".join(out) + "\n"
    if not target.exists() or target.read_text() != text:  # keep incremental builds quiet
        target.write_text(text)


def _constant_doc(name):
    """The ``#:`` comment documenting a constant in the private module that defines it."""
    import importlib
    import pkgutil

    from sphinx.pycode import ModuleAnalyzer

    for info in pkgutil.iter_modules(sinkhorn_ot.__path__):
        try:
            mod = importlib.import_module(f"sinkhorn_ot.{info.name}")
        except Exception:  # an optional backend (e.g. CUDA) that cannot import here
            continue
        if name in getattr(mod, "__all__", ()):
            docs = ModuleAnalyzer.for_module(mod.__name__).find_attr_docs()
            lines = docs.get(("", name))
            if lines:
                return [line for line in lines if line.strip()]
    return []


_write_api_listing()


def _mathjax_dir() -> Path:
    spec = importlib.util.find_spec(_MATHJAX_PKG)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the docs serve MathJax locally: pip install {_MATHJAX_PKG} "
                           '(or pip install ".[docs]")')
    return Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax"


def _copy_mathjax(app, exc):
    if exc is not None or app.builder.format != "html":
        return
    src, dest = _mathjax_dir(), Path(app.outdir) / "_static" / "mathjax"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "tex-chtml.js", dest / "tex-chtml.js")
    fonts = Path("output") / "chtml" / "fonts" / "woff-v2"
    shutil.copytree(src / fonts, dest / fonts, dirs_exist_ok=True)


def _check_mathjax(app):
    if app.builder.format == "html":
        _mathjax_dir()  # fail at the start of the build, not after it


def setup(app):
    app.connect("builder-inited", _check_mathjax)
    app.connect("build-finished", _copy_mathjax)

"Sphinx configuration of the documentation site (built by `make docs` = `python docs/build_site.py`)."

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scaletrain  # noqa: E402

project = "scaletrain"
author = "scaletrain developers"
release = scaletrain.__version__
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
root_doc = "index"
nb_execution_mode = "off"  # render the outputs stored in the notebooks; never run them here
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
html_theme = "furo"
html_title = f"scaletrain {release}"
autodoc_member_order = "bysource"
autodoc_default_options = {"undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
suppress_warnings = ["myst.header"]  # notebooks start with their own title and may skip heading levels
exclude_patterns = ["**/.ipynb_checkpoints"]
default_role = "literal"  # the docstrings are written for nbdev (Markdown): `x` is code, not reST's interpreted text
napoleon_use_ivar = True  # a class's "Attributes:" as fields, not a second description of each attribute
copyright = "2026 onwards, scaletrain developers"

"""Build the documentation site from the notebooks: `python docs/build_site.py [OUT]` (default `_site/`).

Why Sphinx + myst-nb (with the furo theme): nbdev's own generator needs Quarto, which cannot be installed from the
package registry. myst-nb reads `.ipynb` files as they are and renders their *stored* outputs without executing
anything (`nb_execution_mode = "off"`), and Sphinx's autodoc with napoleon turns the Google-style docstrings of the
library ("Args:", "Returns:", "Example:") into an API reference, importing the same package the notebooks export.
mkdocs-jupyter would render notebooks too, but its API reference (mkdocstrings) reads source statically and its
strict mode does not check links inside notebooks; jupyter-book 2 needs Node.js.

The notebooks are nbdev sources, so they are staged first: `#| hide` and `#| default_exp` cells are dropped and the
`#| ...` directive lines removed, so a reader sees the code and the outputs and nothing of the build machinery.
Nothing is written outside `_build/docs/` (the staging folder) and OUT.
"""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
STAGE = ROOT / "_build" / "docs"

LAYERS = [
    ("0_core", "Core: errors, files, registries, config, the parallel degrees, context parallelism"),
    ("1_models", "Models: the model spec and the families"),
    ("2_data", "Data, loggers, metrics, plots"),
    ("3_parallel", "Parallelism: engine, strategies, pipeline, checkpoints"),
    ("4_estimate", "Estimating: memory and the planner"),
    ("5_runs", "Runs: processes, the Trainer, launching"),
    ("6_apps", "Applications: tasks, fine-tuning, sweeps, compression, the panel, the CLI"),
]


def directives(src: str) -> dict:
    "nbdev's `#| name args` lines at the top of a cell."
    out = {}
    for line in src.splitlines():
        s = line.strip()
        if not s.startswith("#|"):
            break
        name, *args = s[2:].split(maxsplit=1)
        out[name.rstrip(":")] = args[0] if args else ""
    return out


def stage_notebook(src: Path, dst: Path) -> str:
    "Copy one notebook for the site without nbdev's machinery; returns its title."
    nb = json.loads(src.read_text())
    cells = []
    for c in nb["cells"]:
        text = "".join(c["source"])
        d = directives(text) if c["cell_type"] == "code" else {}
        if "hide" in d or "default_exp" in d or (c["cell_type"] == "code" and not text.strip()):
            continue
        if d:
            lines = text.splitlines(keepends=True)
            while lines and lines[0].lstrip().startswith("#|"):
                lines.pop(0)
            c = dict(c, source=lines)
        cells.append(c)
    nb["cells"] = cells
    # nbdev_clean strips the language metadata that the highlighter needs
    nb["metadata"] = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python", "pygments_lexer": "ipython3"},
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(nb, indent=1, ensure_ascii=False))
    first = next((c for c in cells if c["cell_type"] == "markdown"), None)
    title = "".join(first["source"]).strip().splitlines()[0].lstrip("# ").strip() if first else src.stem
    return title


def library_modules() -> list[str]:
    "The exported modules, from nbdev's index (scaletrain/_modidx.py)."
    sys.path.insert(0, str(ROOT))
    from scaletrain._modidx import d

    return sorted(d["syms"])


def toctree(entries, maxdepth=1, caption="") -> str:
    head = f":caption: {caption}\n" if caption else ""
    return f"```{{toctree}}\n:maxdepth: {maxdepth}\n{head}\n" + "".join(f"{e}\n" for e in entries) + "```\n"


def stage(into: Path = STAGE) -> list[Path]:
    "Stage every notebook into `into` with the section and API pages; returns the staged notebooks (under nbs/)."
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    staged = []
    for nb in sorted(NBS.rglob("*.ipynb")):
        rel = nb.relative_to(NBS)
        if any(p.startswith((".", "_")) for p in rel.parts) or "runs" in rel.parts:
            continue
        stage_notebook(nb, into / rel)
        staged.append(rel)
    if not any(r.parts[0] == "tutorials" for r in staged) or Path("index.ipynb") not in staged:
        raise SystemExit(f"docs: {NBS} has no index.ipynb or no tutorials")
    mods = library_modules()
    (into / "api").mkdir()
    for m in mods:
        (into / "api" / f"{m}.rst").write_text(f"{m}\n{'=' * len(m)}\n\n.. automodule:: {m}\n   :members:\n")
    (into / "api" / "index.md").write_text(
        "# API reference\n\nGenerated from the docstrings of the exported library.\n\n" + toctree(mods)
    )
    sections = [("tutorials", "Tutorials")] + LAYERS
    for part, title in sections:
        pages = [r.with_suffix("").as_posix() for r in staged if r.parts[0] == part]
        (into / f"{part}.md").write_text(f"# {title}\n\n" + toctree(pages))
    # the home page is the package's index notebook, with the site's table of contents after it
    home = into / "index.ipynb"
    nb = json.loads(home.read_text())
    entries = [p for p, _ in sections] + ["api/index"]
    nb["cells"].append({"cell_type": "markdown", "id": "site-toc", "metadata": {}, "source": toctree(entries, 2)})
    home.write_text(json.dumps(nb, indent=1, ensure_ascii=False))
    return staged


def build(out: Path, stage_dir: Path = STAGE) -> list[Path]:
    "Stage (in `stage_dir`) and build the HTML site into `out`; returns the staged notebooks (relative to nbs/)."
    from sphinx.cmd.build import build_main

    staged = stage(stage_dir)
    args = ["-b", "html", "-q", "-W", "--keep-going", "-c", str(ROOT / "docs"), str(stage_dir), str(out)]
    rc = build_main(args)
    if rc:
        raise SystemExit(f"docs: sphinx-build failed (exit {rc}); see the warnings above")
    return staged


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "_site"
    build(out.resolve())
    print(f"docs: built {out}/index.html")

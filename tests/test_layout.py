"""The package's layout, checked: dependencies point one way (a module imports only modules of lower-numbered
notebooks), no import cycle, no private name imported across modules, only the CLI exits, and no library code outside
the gpt family's files names a GPT attribute."""

import ast
import io
import json
import re
import tokenize
from pathlib import Path
import pytest
from conftest import ROOT

PKG = ROOT / "scaletrain"
MODULES = {  # dotted name -> file, every exported module
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
    for p in PKG.rglob("*.py")
    if p.name != "_modidx.py"
}


def notebook_of(path: Path) -> Path | None:
    "The notebook a module was exported from (nbdev writes it in the module's second line)."
    m = re.search(r"File to edit: (\S+\.ipynb)", path.read_text())
    return (path.parent / m.group(1)).resolve() if m else None


def layer(module: str) -> int:
    "The number of the module's notebook (nbs/3_parallel/37_parallel.ipynb -> 37): its place in the layers."
    nb = notebook_of(MODULES[module])
    assert nb is not None, f"{module} was not exported from a notebook"
    return int(nb.name.split("_", 1)[0])


def imports(module: str) -> list[tuple[str, list[str], int]]:
    "(imported scaletrain module, names imported from it, line) for every import in `module`, at any depth."
    tree = ast.parse(MODULES[module].read_text())
    pkg = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "scaletrain"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "scaletrain":
                continue
            names = [a.name for a in node.names]
            if target in MODULES and not any(f"{target}.{n}" in MODULES for n in names):
                out.append((target, names, node.lineno))
            else:  # `from scaletrain import checkpoint` / `from scaletrain.models import spec`
                out += [(f"{target}.{n}", [], node.lineno) for n in names if f"{target}.{n}" in MODULES]
    return [(t, n, line) for t, n, line in out if t in MODULES and t not in ("scaletrain", module)]


def test_every_module_comes_from_a_numbered_notebook():
    for m in MODULES:
        if m in ("scaletrain", "scaletrain.models", "scaletrain.strategies"):
            continue
        assert layer(m) >= 0


def test_dependencies_point_down_the_layers():
    "A module imports only modules of lower-numbered notebooks (function-level imports included): no cycle possible."
    bad = []
    for m in MODULES:
        if m in ("scaletrain", "scaletrain.models", "scaletrain.strategies"):
            continue
        for target, _, line in imports(m):
            if target in ("scaletrain.models", "scaletrain.strategies"):
                continue
            if layer(target) >= layer(m):
                bad.append(f"{MODULES[m].name}:{line} imports {target} (notebook {layer(target)} >= {layer(m)})")
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    graph = {m: {t for t, _, _ in imports(m)} for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for t in graph[m]:
            visit(t, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])


def test_no_private_name_is_imported_across_modules():
    bad = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {n} from {t}"
        for m in MODULES
        for t, names, line in imports(m)
        for n in names
        if n.startswith("_") and t != m
    ]
    assert not bad, "\n".join(bad)


def _exits(path: Path) -> list[str]:
    "Lines that end the process (sys.exit, raise SystemExit, os._exit, exit()), outside `if __name__ == '__main__'`."
    tree = ast.parse(path.read_text())
    main_blocks = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in main_blocks:
            continue
        src = ast.unparse(node) if isinstance(node, (ast.Call, ast.Raise)) else ""
        if isinstance(node, ast.Call) and re.match(r"(sys\.exit|os\._exit|exit|quit)\(", src):
            out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {src[:60]}")
        if isinstance(node, ast.Raise) and node.exc is not None and "SystemExit" in ast.unparse(node.exc):
            out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {src[:60]}")
    return out


def test_only_the_cli_exits():
    "Library code raises; `scaletrain.cli` alone turns an error into an exit code (`__main__` entry points aside)."
    bad = [line for m, p in MODULES.items() if m != "scaletrain.cli" for line in _exits(p)]
    assert not bad, "\n".join(bad)
    assert _exits(MODULES["scaletrain.cli"]), "the CLI exits through fail()"


# ---- no GPT attribute name outside the gpt family's files ----
GPT_NAMES = {"blocks", "wte", "wpe", "ln_f", "ln_1", "ln_2", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj"}
GPT_PATHS = {"mlp.fc", "mlp.proj", "attn.q_proj"}
GPT_FILES = {PKG / "models" / "gpt.py", ROOT / "nbs" / "1_models" / "11_gpt.ipynb"}
# the hf family describes transformers' own layouts (GPT-2's `transformer.h`, `ln_f`; Llama's `q_proj` ...): its names
GPT_FILES |= {PKG / "models" / "hf.py", ROOT / "nbs" / "1_models" / "17_hf.ipynb"}


def _gpt_names_in(source: str, where: str) -> list[str]:
    """GPT attribute names used as attributes (`x.lm_head`) or in strings naming modules or state-dict keys
    (`"blocks.0."`, `"lm_head"`). Strings inside a `StateDictAdapter` subclass are another library's key names (Hugging
    Face's Llama calls its head `lm_head` too) and are not ours."""
    tree = ast.parse(source)
    adapters = {
        id(n)
        for c in ast.walk(tree)
        if isinstance(c, ast.ClassDef) and any("Adapter" in ast.unparse(b) for b in c.bases)
        for n in ast.walk(c)
    }
    docstrings = {  # prose: a docstring may name a family's modules in an example
        id(d.body[0].value)
        for d in ast.walk(tree)
        if isinstance(d, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and d.body
        and isinstance(d.body[0], ast.Expr)
        and isinstance(d.body[0].value, ast.Constant)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in GPT_NAMES:
            out.append(f"{where}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in adapters | docstrings:
            parts = set(re.split(r"[.\[\]'\"]", node.value))
            if (
                node.value in GPT_NAMES
                or (parts & GPT_NAMES and "." in node.value)
                or any(p in node.value for p in GPT_PATHS)
            ):
                out.append(f"{where}:{node.lineno}: {node.value!r}")
    return out


def _library_sources():
    for p in MODULES.values():
        if p not in GPT_FILES:
            yield str(p.relative_to(ROOT)), p.read_text()
    for nb in sorted((ROOT / "nbs").glob("[0-9]_*/*.ipynb")):  # the library notebooks (tutorials teach one family)
        if nb in GPT_FILES:
            continue
        cells = json.loads(nb.read_text())["cells"]
        for i, c in enumerate(cells):
            if c["cell_type"] == "code":
                src = "".join(c["source"])
                src = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!")))
                yield f"{nb.relative_to(ROOT)} cell {i}", src


def test_no_gpt_attribute_name_outside_the_gpt_family():
    bad = [hit for where, src in _library_sources() for hit in _gpt_names_in(src, where)]
    assert not bad, "\n".join(bad)


def test_the_gpt_name_check_can_fail():
    "The check above finds what it is meant to find (and lets an adapter's foreign key names through)."
    src = 'x = model.lm_head\ny = "blocks.0.attn.q_proj.weight"\nclass A(StateDictAdapter):\n    T = "lm_head.weight"\n'
    hits = _gpt_names_in(src, "s")
    assert hits == ["s:1: .lm_head", "s:2: 'blocks.0.attn.q_proj.weight'"], hits


def test_the_layer_check_can_fail(tmp_path, monkeypatch):
    "An upward import is reported (a module of notebook 04 importing one of notebook 53)."
    fake = tmp_path / "config.py"
    fake.write_text(
        "# AUTOGENERATED! DO NOT EDIT! File to edit: ../nbs/0_core/04_config.ipynb.\nfrom .train import Trainer\n"
    )
    monkeypatch.setitem(MODULES, "scaletrain.config", fake)
    with pytest.raises(AssertionError, match="imports scaletrain.train"):
        test_dependencies_point_down_the_layers()


def test_tokenize_sanity():
    "Every library file is valid Python (what the checks above parse)."
    for p in MODULES.values():
        list(tokenize.generate_tokens(io.StringIO(p.read_text()).readline))

"""Run notebooks as `nbdev_test` does and store their outputs in them: `python docs/execute.py [NB ...]`.

`make tutorials` runs it on every notebook (tutorials and library) and then `nbdev_clean`, which keeps the outputs
and strips the volatile metadata. Cells marked `#| eval: false`, `notest` or `slow` are skipped, as in CI.
Outputs name the temporary folders the notebooks make (`tempfile.mkdtemp(prefix=...)`): their random part is
replaced by `XXXXXXXX` (and the machine's temp root by `/tmp`), so a re-run changes only what really changed.
"""

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from nbdev.frontmatter import FrontmatterProc
from nbdev.process import NBProcessor

ROOT = Path(__file__).resolve().parents[1]
SKIP_FLAGS = {"notest", "slow"}
_TMP = re.compile(re.escape(tempfile.gettempdir()) + r"/([A-Za-z][A-Za-z0-9-]*-|tmp)[a-z0-9_]{8}(?=[/'\"\s,)]|$)")


def _skip(cell) -> bool:
    "nbdev_test's rule: markdown, `eval: false` and skip-flagged code cells are not run."
    if cell.cell_type != "code":
        return True
    d = getattr(cell, "directives_", {}) or {}
    if d.get("eval:", [""])[0].lower() == "false":
        return True
    return bool(SKIP_FLAGS & d.keys())


def stable(text: str) -> str:
    return _TMP.sub(lambda m: "/tmp/" + ("" if m.group(1) == "tmp" else m.group(1)) + "XXXXXXXX", text)


def _stable_output(o: dict) -> dict:
    if "text" in o:
        o["text"] = [stable(t) for t in ([o["text"]] if isinstance(o["text"], str) else o["text"])]
    for k, v in o.get("data", {}).items():
        if k.startswith("text/"):
            o["data"][k] = [stable(t) for t in ([v] if isinstance(v, str) else v)]
    if "execution_count" in o:
        o["execution_count"] = None
    return o


def execute(fn: Path) -> float:
    "Run `fn` top to bottom in a fresh kernel and write its outputs into it; returns seconds."
    fn = fn.resolve()
    t0 = time.time()
    os.environ["IN_TEST"] = "1"
    nb = NBProcessor(fn, procs=FrontmatterProc, process=True).nb
    k = CaptureShell(fn)
    with working_directory(fn.parent):
        k.run_all(nb, exc_stop=True, preproc=_skip)
    outs = {c.get("id"): c.get("outputs", []) for c in nb.cells if c.cell_type == "code"}
    raw = json.loads(fn.read_text())
    for c in raw["cells"]:
        if c["cell_type"] == "code":
            c["execution_count"] = None
            c["outputs"] = [_stable_output(dict(o)) for o in outs.get(c.get("id"), [])]
    tmp = fn.with_name(f".{fn.name}.tmp")
    tmp.write_text(json.dumps(raw, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, fn)  # atomic: a failed run leaves the notebook as it was
    return time.time() - t0


if __name__ == "__main__":
    nbs = [Path(a) for a in sys.argv[1:]] or sorted(p for p in (ROOT / "nbs").rglob("*.ipynb") if "runs" not in p.parts)
    for fn in nbs:
        print(f"{execute(fn):5.0f}s {fn}", flush=True)

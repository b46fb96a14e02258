"""The README's images, taken from the project's own output, never drawn by hand: `python docs/readme_images.py`.

`make tutorials` runs it after storing the notebooks' outputs, so the README shows the plot the tutorial's last run
drew. The launch panel's image (nbs/images/launch_panel.png) comes from the browser test
(`SCALETRAIN_UPDATE_SCREENSHOT=1 pytest tests/test_browser.py`)."""

import base64
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# image in the repository -> (notebook, the cell whose first PNG output it is: a line of that cell's source)
IMAGES = {
    "nbs/images/pretraining_curves.png": (
        "nbs/tutorials/01_pretraining.ipynb",
        "display(Image(filename=str(trainer.run_dir / \"loss.png\")))",
    ),
}


def stored_png(notebook: Path, marker: str) -> bytes:
    "The first PNG output of the first code cell of `notebook` whose source contains `marker`."
    nb = json.loads(Path(notebook).read_text())
    for c in nb["cells"]:
        if c["cell_type"] == "code" and marker in "".join(c["source"]):
            for o in c.get("outputs", []):
                png = o.get("data", {}).get("image/png")
                if png:
                    return base64.b64decode("".join(png) if isinstance(png, list) else png)
            raise SystemExit(f"{notebook}: the cell with {marker!r} has no stored plot; run `make tutorials`")
    raise SystemExit(f"{notebook}: no code cell contains {marker!r}")


def main() -> int:
    for dest, (nb, marker) in IMAGES.items():
        png, p = stored_png(ROOT / nb, marker), ROOT / dest
        if not p.exists() or p.read_bytes() != png:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp")
            tmp.write_bytes(png)
            tmp.replace(p)  # atomic
            print(f"wrote {dest} ({len(png) // 1024} KiB) from {nb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of `scaletrain data prepare` against the size of its input: 1x, 2x, 4x and 8x the stdlib corpus.

Copy k of the stdlib is every stdlib file with its lines in a fixed shuffled order (seed k), so no copy is an exact
or near duplicate of another: every document is new work, and the LSH index grows with the input as it would on
distinct data. Peak RSS is sampled (psutil, every 50 ms) over the main process and its worker processes together,
and separately for the main process alone.

    .venv/bin/python benchmarks/data_memory.py [--sizes 1,2,4,8] [--workers 2] [--out results/data_memory.json]
"""

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_copies(base: Path, k: int) -> Path:
    "A folder of k shuffled copies of the stdlib (copy i: every file's lines in the order of seed i)."
    from scaletrain.data import stdlib_files, stdlib_root

    root, out = stdlib_root(), base / f"x{k}"
    for i in range(k):
        for f in stdlib_files():
            lines = f.read_bytes().split(b"\n")
            if i:
                random.Random(i * 1_000_003 + len(lines)).shuffle(lines)
            p = out / f"copy{i}" / f.relative_to(root)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"\n".join(lines))
    return out


class Peak:
    "Peak RSS of this process (and, with children, of its worker processes summed) while running."

    def __init__(self):
        self.me, self.total, self.stop = 0, 0, threading.Event()

    def watch(self):
        proc = psutil.Process()
        while not self.stop.is_set():
            try:
                me = proc.memory_info().rss
                kids = sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                continue
            self.me, self.total = max(self.me, me), max(self.total, me + kids)
            time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_memory.json"))
    a = ap.parse_args()
    from scaletrain.config import load_config, prep_config
    from scaletrain.dataprep import prepare

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in [int(x) for x in a.sizes.split(",")]:
            src = make_copies(Path(tmp), k)
            mb = sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) / 1e6
            cfg = load_config(overrides=[f"data.source={src}"])
            peak = Peak()
            t = threading.Thread(target=peak.watch, daemon=True)
            t.start()
            t0 = time.time()
            ds = prepare(cfg, prep_config([f"prep.workers={a.workers}"]), out=Path(tmp) / "ds", show_progress=False)
            secs = time.time() - t0
            peak.stop.set()
            t.join()
            st = json.loads((ds / "stats.json").read_text())["stages"]
            row = dict(
                copies=k,
                input_mb=round(mb, 1),
                documents=sum(x[0] for x in st["input"]),
                kept=sum(x[0] for x in st["labels"]),
                seconds=round(secs, 1),
                peak_rss_mb_main=round(peak.me / 1e6),
                peak_rss_mb_all=round(peak.total / 1e6),
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(src)
            shutil.rmtree(Path(tmp) / "ds")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(workers=a.workers, rows=rows), indent=1))


if __name__ == "__main__":
    main()

"""How long `scaletrain plan` takes to answer, feasible or not, up to 16,384 GPUs (a benchmark, not a test).

    python benchmarks/plan_speed.py            # prints a markdown table; numbers go to benchmarks/RESULTS.md

Each query is timed in-process (`plan` + the refusal's `why_nothing_fits`, best of 3) and once as a whole
`python -m scaletrain.cli plan` command (process start and the torch import included)."""

import subprocess
import sys
import time

from scaletrain.plan import plan, preset, why_nothing_fits

QUERIES = [
    ("7B on 8 H100", dict(params=7e9, gpus=8), ["--params", "7e9", "--gpus", "8"]),
    (
        "llama3-70b on 1,024 H100, 15T tokens",
        dict(model=preset("llama3-70b"), gpus=1024, tokens=15e12),
        ["--preset", "llama3-70b", "--gpus", "1024", "--tokens", "15e12"],
    ),
    (
        "llama3-405b on 16,384 H100",
        dict(model=preset("llama3-405b"), gpus=16384, global_batch=2048),
        ["--preset", "llama3-405b", "--gpus", "16384", "--global-batch", "2048"],
    ),
    (
        "gpt3-175b on 16,384 A100-40GB",
        dict(model=preset("gpt3-175b"), gpus=16384, gpu="a100-40gb", global_batch=16384),
        ["--preset", "gpt3-175b", "--gpus", "16384", "--gpu", "a100-40gb", "--global-batch", "16384"],
    ),
    ("70B on 8 GPUs (nothing fits)", dict(params=70e9, gpus=8), ["--params", "70e9", "--gpus", "8"]),
    (
        "1e15 params on 16,384 GPUs (absurd)",
        dict(params=1e15, gpus=16384, global_batch=16384),
        ["--params", "1e15", "--gpus", "16384", "--global-batch", "16384"],
    ),
]


def timed(kw):
    best = None
    for _ in range(3):
        t = time.perf_counter()
        model = kw.pop("model", None)
        pl = plan(model, **kw)
        kw["model"] = model
        msg = "" if pl.layouts else why_nothing_fits(pl)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, pl, msg


def main():
    print("| query | layouts listed / evaluated | in-process s | whole CLI s | answer |")
    print("|---|---|---|---|---|")
    for name, kw, argv in QUERIES:
        dt, pl, msg = timed(dict(kw))
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "scaletrain.cli", "plan", *argv], capture_output=True, text=True)
        cli = time.perf_counter() - t
        answer = f"best: {pl.best.describe()}" if pl.layouts else "refused: " + msg.split(":")[1].strip()[:40] + "..."
        print(
            f"| {name} | {len(pl.layouts)} / {pl.considered} | {dt:.2f} | {cli:.1f} (exit {r.returncode}) | {answer} |"
        )


if __name__ == "__main__":
    main()

"""Chaos benchmark: SIGKILL a 2-process `scaletrain train` at random moments, resume it, and check nothing was lost.

Each trial starts the same run as an uninterrupted reference (a tiny GPT, `--nproc 2`, gloo, a checkpoint every
`--ckpt-every` steps, dropout on so the random streams must be restored too) and, once its first checkpoint exists and
a random number of further steps have been logged, kills (SIGKILL) one of:

* `rank`: one of the two ranks, chosen at random;
* `launcher`: the `scaletrain train` process itself (torchrun and the ranks must not outlive it);
* `checkpoint`: a random rank while a checkpoint is being written (its `checkpoints/.step_XXXXXXXX.tmp` folder
  exists; polled every millisecond), at a random one of the checkpoints after the first.

Then it waits for every process of the run to end, counts the ones still alive after `--grace` seconds (orphans:
any process whose command line names the run folder), and continues the run with
`scaletrain train --nproc 2 --resume RUN` to its last step.

Measured per trial, and defined precisely:

* `exact`: the resumed run's `metrics.jsonl` logs every step 1..N exactly once, and every logged training loss equals
  the reference's (to the 6 decimals the log keeps); the run finished (`summary.json` status `finished`).
* `recomputed`: steps logged before the kill that came after the checkpoint the resume started from; they are run
  again (expected: the price of the checkpoint interval).
* `lost`: work a checkpoint had saved that the resume did not keep: (the step of the newest checkpoint on disk that
  verifies against its manifest, found after the kill) minus (the step the resume started from), plus the number of
  steps up to that step whose record is missing from `metrics.jsonl` after the resume. Must be 0.
* `orphans`: processes of the run still alive `--grace` seconds after the kill. Must be 0.

Usage: python benchmarks/chaos.py --trials 30 --seed 0 [--out benchmarks/results/chaos.json]
"""

from __future__ import annotations
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
import psutil
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scaletrain.checkpoint import checkpoint_step, family_folders, latest_checkpoint  # noqa: E402
from scaletrain.files import atomic_write_text, read_json  # noqa: E402
from scaletrain.metrics import read_metrics  # noqa: E402

KINDS = ("rank", "launcher", "checkpoint")


def overrides(work: Path, name: str, steps: int, ckpt_every: int) -> list:
    return [
        f"data.source={work / 'corpus'}",
        f"data.cache_dir={work / 'cache'}",
        f"run.out_dir={work / 'runs'}",
        f"run.name={name}",
        "run.log_every=1",
        "train.device=cpu",
        "model.family=gpt",
        "model.n_layer=2",
        "model.n_embd=32",
        "model.n_head=2",
        "model.block_size=32",
        "model.dropout=0.1",
        "train.micro_batch=4",
        f"train.steps={steps}",
        "train.warmup_steps=2",
        f"train.eval_every={2 * ckpt_every}",
        "train.eval_iters=2",
        f"train.ckpt_every={ckpt_every}",
        "train.keep_checkpoints=2",
    ]


def cli(*args) -> list:
    return [sys.executable, "-m", "scaletrain.cli", *map(str, args)]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def logged(run: Path) -> dict:
    "step -> training loss, and whether some step was logged twice."
    recs = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    return {r["step"]: r["loss"] for r in recs}, len(recs) != len({r["step"] for r in recs})


def last_step(run: Path) -> int:
    recs = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    return max(recs, default=0)


def ranks_of(pid: int) -> dict:
    "rank -> psutil.Process of the torchrun ranks under `pid`."
    out = {}
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return out
    for p in kids:
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            out[int(env["RANK"])] = p
    return out


def processes_of(run: Path) -> list:
    "Live processes whose command line names the run folder (ranks, torchrun) or its name and runs folder (launcher)."
    me, found = os.getpid(), []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] == me or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if str(run) in cmd or (f"run.name={run.name}" in cmd and str(run.parent) in cmd):
                found.append(p)
        except psutil.Error:
            continue
    return found


def wait_for(cond, proc, timeout: float, poll: float):
    "Poll `cond()` until true (its value) or `proc` has ended / `timeout` passed (None)."
    t = time.monotonic()
    while time.monotonic() - t < timeout and proc.poll() is None:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    return None


def trial(i: int, kind: str, rng: random.Random, a, work: Path, ref: dict) -> dict:
    name = f"t{i:03d}"
    run = work / "runs" / name
    rec = dict(trial=i, kind=kind)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cli("train", "--nproc", 2, *overrides(work, name, a.steps, a.ckpt_every)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
        start_new_session=True,
    )
    first = lambda: any((d / "manifest.json").exists() for d in family_folders(run / "checkpoints"))
    wait_for(first, proc, 300, 0.01)
    killed = None
    if kind == "checkpoint":
        n_ck = a.steps // a.ckpt_every - 1  # checkpoints after the first, the last one (the final step) included
        target = a.ckpt_every * (1 + rng.randint(1, max(1, n_ck - 1)))
        tmp = run / "checkpoints" / f".step_{target:08d}.tmp"
        if wait_for(lambda: tmp.exists(), proc, 300, 0.001):
            rank = rng.randint(0, 1)
            victim = ranks_of(proc.pid).get(rank)
            if victim is not None:
                victim.send_signal(signal.SIGKILL)
                killed = f"rank {rank} writing step {target}"
                rec["in_checkpoint_write"] = tmp.exists() and not (run / "checkpoints" / tmp.name[1:-4]).exists()
    else:
        at = a.ckpt_every + rng.randint(0, a.steps - a.ckpt_every - 2)
        if wait_for(lambda: last_step(run) >= at, proc, 300, 0.005):
            if kind == "launcher":
                proc.send_signal(signal.SIGKILL)
                killed = "launcher"
            else:
                rank = rng.randint(0, 1)
                victim = ranks_of(proc.pid).get(rank)
                if victim is not None:
                    victim.send_signal(signal.SIGKILL)
                    killed = f"rank {rank}"
    rec["killed"] = killed
    rec["kill_step"] = last_step(run)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + a.grace  # the run's processes must all end within the grace period
    while processes_of(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = processes_of(run)
    rec["orphans"] = len(left)
    rec["orphan_cmds"] = [" ".join(p.cmdline())[:200] for p in left if p.is_running()]
    for p in left:  # do not let one trial's leftovers disturb the next
        try:
            p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    ck = latest_checkpoint(run) if run.exists() else None
    on_disk = max(
        (checkpoint_step(d.name) for d in family_folders(run / "checkpoints") if (d / "manifest.json").exists()),
        default=0,
    )
    start = checkpoint_step(ck.name) if ck else 0
    rec.update(checkpoint_step=start, newest_verified_on_disk=on_disk)
    if killed is None or read_json(run / "summary.json") and read_json(run / "summary.json")["status"] == "finished":
        rec["note"] = "the run ended before the kill"  # counted, and still compared with the reference
    r = subprocess.run(cli("train", "--nproc", 2, "--resume", run), capture_output=True, text=True, env=ENV)
    rec["resume_rc"] = r.returncode
    rec["resumed_at"] = int(m.group(1)) if (m := re.search(r"resumed .* at step (\d+)", r.stdout)) else None
    got, twice = logged(run)
    missing_kept = sum(1 for s in range(1, start + 1) if s not in got)
    rec["recomputed"] = max(0, rec["kill_step"] - start)
    rec["lost"] = max(0, on_disk - (rec["resumed_at"] if rec["resumed_at"] is not None else start)) + missing_kept
    summary = read_json(run / "summary.json") or {}
    rec["exact"] = (
        r.returncode == 0
        and not twice
        and summary.get("status") == "finished"
        and sorted(got) == list(range(1, a.steps + 1))
        and all(got[s] == ref[s] for s in got)
    )
    rec["seconds"] = round(time.monotonic() - t0, 1)
    if not a.keep:
        shutil.rmtree(run, ignore_errors=True)
    return rec


def make_corpus(d: Path):
    d.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        (d / f"doc{i}.txt").write_text((f"def f{i}(x):\n    return x * {i} + {i % 3}\n\n" * 40) + "the end\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--ckpt-every", type=int, default=4)
    p.add_argument("--grace", type=float, default=10.0, help="seconds the run's processes get to end after a kill")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chaos.json"))
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    p.add_argument("--keep", action="store_true", help="keep each trial's run folder")
    a = p.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="scaletrain-chaos-")).resolve()
    make_corpus(work / "corpus")
    t0 = time.time()
    r = subprocess.run(
        cli("train", "--nproc", 2, *overrides(work, "reference", a.steps, a.ckpt_every)),
        capture_output=True,
        text=True,
        env=ENV,
    )
    if r.returncode:
        sys.exit(f"chaos: the reference run failed:\n{r.stderr[-3000:]}")
    ref, _ = logged(work / "runs" / "reference")
    rng = random.Random(a.seed)
    kinds = [KINDS[i % 3] for i in range(a.trials)]
    rng.shuffle(kinds)
    rows = [trial(i, k, rng, a, work, ref) for i, k in enumerate(tqdm(kinds, desc="chaos trials", unit="trial"))]
    totals = dict(
        trials=len(rows),
        killed=sum(r["killed"] is not None for r in rows),
        by_kind={k: sum(r["kind"] == k for r in rows) for k in KINDS},
        killed_in_checkpoint_write=sum(bool(r.get("in_checkpoint_write")) for r in rows),
        exact_resumes=sum(r["exact"] for r in rows),
        steps_lost=sum(r["lost"] for r in rows),
        orphans=sum(r["orphans"] for r in rows),
        recomputed_steps=sum(r["recomputed"] for r in rows),
        resume_failures=sum(r["resume_rc"] != 0 for r in rows),
        wall_s=round(time.time() - t0, 1),
    )
    out = dict(
        seed=a.seed, steps=a.steps, ckpt_every=a.ckpt_every, nproc=2, grace_s=a.grace, totals=totals, trials=rows
    )
    atomic_write_text(a.out, json.dumps(out, indent=1))
    print(
        f"\n{'trial':>5} {'kind':10} {'killed':28} {'kill@':>5} {'ckpt':>4} {'recomp':>6} {'lost':>4} {'orph':>4} exact"
    )
    for r in rows:
        print(
            f"{r['trial']:5d} {r['kind']:10} {str(r['killed']):28} {r['kill_step']:5d} {r['checkpoint_step']:4d} "
            f"{r['recomputed']:6d} {r['lost']:4d} {r['orphans']:4d} {r['exact']}"
        )
    print("\n" + "\n".join(f"{k:28} {v}" for k, v in totals.items()))
    print(f"results: {a.out}")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if totals["steps_lost"] == 0 and totals["orphans"] == 0 and totals["exact_resumes"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

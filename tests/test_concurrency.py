"""Concurrent runs in one runs folder lose nothing: four `scaletrain train` started together, with default names (the
same second, the same config: the same name is tried by all four) and one new token cache they all need, each get a
folder of their own with a whole log, summary and checkpoints, and the cache is built once (under its file lock);
two runs given the same `run.name` at once: one runs, the other is refused in one line and touches nothing."""

import os
import subprocess
import sys
from conftest import tiny
from scaletrain.checkpoint import latest_checkpoint, verify_checkpoint
from scaletrain.files import read_json
from scaletrain.metrics import read_metrics


def start_together(argvs, tmp_path) -> list:
    "Start `python -m scaletrain.cli` once per argument list, all released at the same moment; their results."
    gate = tmp_path / "go"
    code = (
        "import os, sys, time, runpy\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.001)\n"
        "sys.argv = ['scaletrain', *sys.argv[1:]]\n"
        "runpy.run_module('scaletrain.cli', run_name='__main__')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *map(str, a)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for a in argvs
    ]
    gate.touch()  # every process is already waiting on it, imports done
    out = []
    for p in procs:
        so, se = p.communicate(timeout=600)
        out.append((p.returncode, so, se))
    return out


def test_four_concurrent_runs_in_one_runs_folder_lose_nothing(corpus, tmp_path):
    runs, cache = tmp_path / "runs", tmp_path / "new_cache"
    args = ["train", *tiny(corpus, cache, runs)]  # no run.name: each run names its own folder
    results = start_together([args] * 4, tmp_path)
    for rc, so, se in results:
        assert rc == 0, se[-3000:]
    folders = sorted(d for d in runs.iterdir() if d.is_dir())
    assert len(folders) == 4, [d.name for d in folders]
    said = sorted(next(l for l in so.splitlines() if "run folder" in l).rsplit(" ", 1)[1] for _, so, _ in results)
    assert said == [str(d) for d in folders]  # each process reports the folder it wrote, none shared
    logs = []
    for d in folders:
        recs = read_metrics(d / "metrics.jsonl")
        assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6], d
        assert [r["step"] for r in recs if "val_loss" in r] == [0, 3, 6], d
        assert read_json(d / "summary.json")["status"] == "finished"
        assert read_json(d / "summary.json")["run_dir"] == str(d)
        ck = latest_checkpoint(d)
        assert ck.parent == d / "checkpoints" and ck.name == "step_00000006" and verify_checkpoint(ck)
        logs.append([r["loss"] for r in recs if "loss" in r])
    assert all(l == logs[0] for l in logs)  # the same config on the same (shared) tokens: the same run
    # the shared cache: built once, whole, with nothing half-written beside it
    built = [p for p in (cache / "tokens").iterdir() if not p.name.endswith(".lock")]
    assert len(built) == 1 and (built[0] / "meta.json").is_file(), [p.name for p in built]
    assert sum("tokenizing" in se for _, _, se in results) == 1  # one process tokenized; three waited and read it


def test_two_runs_given_the_same_name_at_once(corpus, cache_dir, tmp_path):
    runs = tmp_path / "runs"
    results = start_together([["train", *tiny(corpus, cache_dir, runs, "run.name=same")]] * 2, tmp_path)
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], [se[-2000:] for _, _, se in results]
    _, _, refused = next(r for r in results if r[0] == 2)
    lines = [l for l in refused.splitlines() if l.strip()]
    assert lines == [
        f"scaletrain: error: run.name=same: {runs / 'same'} already exists; choose another run.name or continue it "
        f"with --resume {runs / 'same'}"
    ]
    d = runs / "same"  # the run that won is whole: the refused one wrote nothing into it
    assert [r["step"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert read_json(d / "summary.json")["status"] == "finished" and [p.name for p in runs.iterdir()] == ["same"]

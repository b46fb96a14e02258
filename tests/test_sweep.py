"""Sweeps: runs in parallel processes, the comparison table and plot, best.yaml; a bad key stops everything before it
starts."""

import csv
import json
from conftest import run_cli
from ft_helpers import ft_overrides, live_copy, live_save, pets, pretrained  # noqa: F401 (fixtures)
from scaletrain.config import load_config


def test_sweep_cli_grid_in_parallel(tmp_path, pets, pretrained, cache_dir):
    fixed = [
        o
        for o in ft_overrides(tmp_path, pretrained, pets, cache_dir, "train.steps=4", "train.eval_every=2")
        if not o.startswith("train.lr=")
    ]
    r = run_cli("sweep", "--parallel", "2", "--out", tmp_path / "sw", "--vary", "train.lr=0,3e-3", *fixed)
    assert r.returncode == 0, r.stderr[-3000:]
    sw = tmp_path / "sw"
    rows = list(csv.DictReader((sw / "results.csv").open()))
    assert sorted(x["train.lr"] for x in rows) == ["0", "3e-3"] and all(x["status"] == "finished" for x in rows)
    best = [float(x["best_accuracy"]) for x in rows]
    assert best == sorted(best, reverse=True)  # ranked, best first
    for x in rows:  # each run's own folder and log, its best = the max of its eval records
        evals = [json.loads(l) for l in (sw / "runs" / x["run"] / "metrics.jsonl").read_text().splitlines()]
        assert max(e["accuracy"] for e in evals if "accuracy" in e) == float(x["best_accuracy"])
        assert (sw / "logs" / f"{x['run']}.log").stat().st_size > 0
    assert load_config(sw / "best.yaml").train.lr == float(rows[0]["train.lr"])
    assert (sw / "sweep.png").stat().st_size > 1000 and json.loads((sw / "results.json").read_text())["best"] == rows[
        0
    ]["run"]
    assert "best: " in r.stdout and "best_accuracy" in r.stdout


def test_sweep_bad_input_starts_nothing(tmp_path, pets, pretrained, cache_dir):
    import pytest
    from scaletrain.config import ConfigError
    from scaletrain.sweep import sweep, parse_vary

    fixed = [o for o in ft_overrides(tmp_path, pretrained, pets, cache_dir) if not o.startswith("train.lr=")]
    for vary, want in (
        ("train.lrr=1e-3,1e-2", "did you mean 'train.lr'"),
        ("train.lr=log:1e-4:1e-2", "ranges need --random N"),
        ("finetune.freeze_blocks=0,9", "more than the model's 2 blocks"),
        ("run.name=a,b", "set by the sweep"),
    ):
        with pytest.raises(ConfigError) as e:
            sweep(dict([parse_vary(vary)]), fixed, out=tmp_path / "sw")
        assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
    r = run_cli("sweep", "--out", tmp_path / "sw", "--vary", "train.lrr=1e-3,1e-2", *fixed)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "did you mean 'train.lr'" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "sw").exists()
    # a key varied twice, an --out that is a file: one line, nothing run or written
    (tmp_path / "afile").write_text("x")
    for args, line in (
        (["--vary", "train.lr=1e-3", "--vary", "train.lr=1e-2"], "--vary train.lr: given twice; put every value"),
        (["--vary", "train.lr=1e-3", "--out", tmp_path / "afile"], "is a file, not a folder"),
    ):
        out = [] if "--out" in args else ["--out", tmp_path / "sw"]
        r = run_cli("sweep", *out, *args, *fixed)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and line in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "sw").exists() and (tmp_path / "afile").read_text() == "x"


def test_random_search_draws_inside_the_ranges_and_repeats_with_its_seed():
    import math
    import pytest
    from scaletrain.config import ConfigError
    from scaletrain.sweep import parse_vary, expand

    space = dict(
        [
            parse_vary("train.lr=log:1e-4:3e-3"),
            parse_vary("train.weight_decay=uniform:0:0.2"),
            parse_vary("finetune.freeze_blocks=0,1,2"),
        ]
    )
    assert space["train.lr"] == ("log", 1e-4, 3e-3) and space["finetune.freeze_blocks"] == ["0", "1", "2"]
    runs = expand(space, "random", n=40, seed=3)
    assert (
        len(runs) == 40
        and runs == expand(space, "random", n=40, seed=3)
        and runs != expand(space, "random", n=40, seed=4)
    )
    lrs = [float(r["train.lr"]) for r in runs]
    assert all(1e-4 <= x <= 3e-3 for x in lrs) and all(0 <= float(r["train.weight_decay"]) <= 0.2 for r in runs)
    assert {r["finetune.freeze_blocks"] for r in runs} == {"0", "1", "2"}
    # log-uniform: about as many draws below the geometric middle as above it
    mid = math.sqrt(1e-4 * 3e-3)
    assert 10 <= sum(x < mid for x in lrs) <= 30
    for bad in ("train.lr=log:0:1", "train.lr=uniform:2:1", "train.lr=log:a:b", "train.lr="):
        with pytest.raises(ConfigError):
            parse_vary(bad)
    with pytest.raises(ConfigError, match="ranges need --random"):
        expand(space, "grid")


def test_a_sweep_starts_every_run_from_the_same_held_checkpoint(tmp_path, pets, pretrained, cache_dir, monkeypatch):
    """`finetune.init` names a pretraining run that trains on and saves before the runs start: every run of the sweep
    starts from the step that was newest when the sweep began (not each from whatever is newest when it starts),
    that step is held on disk until the last run ends, and nothing holds it after."""
    import scaletrain.sweep as sw
    from scaletrain import checkpoint as ckpt

    run = live_copy(pretrained, tmp_path)
    start = ckpt.latest_checkpoint(run)
    real, newer = sw.run_all, []

    def save_then_run(runs, parallel, done):
        newer.append(live_save(run))  # keep_checkpoints=1: without the hold, `start` would go here
        assert start.is_dir()
        return real(runs, parallel, done)

    monkeypatch.setattr(sw, "run_all", save_then_run)
    fixed = [
        o
        for o in ft_overrides(tmp_path, run, pets, cache_dir, "train.steps=2", "train.eval_every=2")
        if not o.startswith("train.lr=")
    ]
    res = sw.sweep({"train.lr": ["1e-3", "3e-3"]}, fixed, parallel=2, out=tmp_path / "sw")
    assert [r["status"] for r in res.rows] == ["finished", "finished"], res.rows
    for r in res.rows:
        assert load_config(tmp_path / "sw" / "runs" / r["run"] / "config.yaml").finetune.init == str(start)
    assert newer[0].is_dir() and not (run / "checkpoints" / ckpt.READERS).exists()
    live_save(run)
    assert not start.exists()  # released: the live run's next save prunes it


def test_sigterm_stops_the_sweeps_runs_with_it(tmp_path):
    "SIGTERM (timeout, Slurm, docker stop) to a sweep stops its runs as Ctrl-C does: none is left running alone."
    import os
    import signal
    import sys
    import threading
    import psutil
    import pytest
    from scaletrain.sweep import Run, run_all

    runs = [
        Run(
            f"r{i}",
            {},
            [sys.executable, "-c", "import time; time.sleep(120)"],
            tmp_path / f"r{i}",
            tmp_path / f"{i}.log",
        )
        for i in range(2)
    ]
    threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        run_all(runs, parallel=2)
    assert signal.getsignal(signal.SIGTERM) is before  # the sweep's handler is put back
    for r in runs:
        assert r.proc is not None and r.proc.poll() is not None
        assert not psutil.pid_exists(r.proc.pid) or psutil.Process(r.proc.pid).status() == psutil.STATUS_ZOMBIE


def test_a_range_over_a_whole_number_key_draws_whole_numbers():
    "train.steps=uniform:10:30 draws whole steps (the config refuses 15.4), a float key keeps its draw."
    from scaletrain.sweep import expand, parse_space

    runs = expand(parse_space(["train.steps=uniform:10:30", "train.lr=log:1e-4:1e-2"]), "random", 20, seed=3)
    steps = [r["train.steps"] for r in runs]
    assert all(s.isdigit() and 10 <= int(s) <= 30 for s in steps) and len(set(steps)) > 3
    assert all(1e-4 <= float(r["train.lr"]) <= 1e-2 for r in runs) and any("." in r["train.lr"] for r in runs)
    for r in runs[:3]:
        load_config(overrides=[f"{k}={v}" for k, v in r.items()] + ["train.warmup_steps=0"])

"""Restarts that resume: `--max-restarts` / `launch(max_restarts=)` relaunch a failed job with a fresh rendezvous,
from the latest verified checkpoint, with metrics.jsonl cut back to it; a job that keeps failing stops after N."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
import psutil
import pytest
from conftest import run_cli, tiny
from scaletrain.checkpoint import family_folders, latest_checkpoint
from scaletrain.launch import launch
from scaletrain.metrics import read_metrics

STEPS = 30


def overrides(corpus, cache_dir, out, name):
    # a checkpoint every 5 steps, kept 2 (retention by step number); evaluations every 10
    return tiny(
        corpus,
        cache_dir,
        out,
        f"run.name={name}",
        f"train.steps={STEPS}",
        "train.eval_every=10",
        "train.ckpt_every=5",
        "train.keep_checkpoints=2",
        "model.dropout=0.1",  # the dropout stream must be restored too for equal losses
    )


def losses(run_dir) -> dict:
    "step -> logged training loss; every step must be logged exactly once."
    recs = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"steps logged more than once or out of order: {steps}"
    return {r["step"]: r["loss"] for r in recs}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir):
    "The same job, 2 processes, never interrupted."
    out = tmp_path_factory.mktemp("restart_ref")
    r = run_cli("train", "--nproc", "2", *overrides(corpus, cache_dir, out, "ref"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "ref"


def _rank_of(p: psutil.Process) -> int | None:
    try:
        env = p.environ()
    except psutil.Error:
        return None
    return int(env["RANK"]) if "RANK" in env and "TORCHELASTIC_RUN_ID" in env else None


def _checkpoint_step(run_dir: Path) -> int | None:
    done = [d for d in family_folders(run_dir / "checkpoints") if (d / "manifest.json").exists()]
    return int(done[-1].name[5:]) if done else None


def _trained_step(run_dir: Path) -> int | None:
    m = run_dir / "metrics.jsonl"
    steps = [r["step"] for r in read_metrics(m) if "loss" in r] if m.exists() else []
    return steps[-1] if steps else None


def kill_rank(root_pid: int, run_dir: Path, when=_checkpoint_step, rank: int = 1, timeout: float = 300) -> int:
    """SIGKILL rank `rank` (found among `root_pid`'s descendants) once `when(run_dir)` gives a step (default: the first
    checkpoint is on disk), while the job is still running; returns that step."""
    t = time.time()
    while time.time() - t < timeout:
        assert psutil.pid_exists(root_pid), "the job ended before a rank could be killed"
        step = when(run_dir)
        if step is not None:
            assert step < STEPS, "the job got to its end before a rank could be killed"
            for p in psutil.Process(root_pid).children(recursive=True):
                if _rank_of(p) == rank:
                    p.send_signal(signal.SIGKILL)
                    return step
        time.sleep(0.02)
    raise AssertionError("the job did not get there")


def start_cli(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "scaletrain.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
        start_new_session=True,
    )


def check_resumed_run(run_dir: Path, reference: Path):
    got, want = losses(run_dir), losses(reference)
    assert list(got) == list(range(1, STEPS + 1))
    assert got == want  # exact: a resume restores weights, optimizer, data position and RNG bit for bit
    evals = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]
    assert evals == [0, 10, 20, 30]
    latest = latest_checkpoint(run_dir)
    assert latest.name == f"step_{STEPS:08d}" and latest.is_dir()
    assert [d.name for d in family_folders(run_dir / "checkpoints")] == [f"step_{STEPS - 5:08d}", f"step_{STEPS:08d}"]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and s["steps"] == STEPS and s["restarts"] == 1


def test_cli_restart_resumes_from_checkpoint(reference, corpus, cache_dir, tmp_path):
    proc = start_cli("train", "--nproc", "2", "--max-restarts", "1", *overrides(corpus, cache_dir, tmp_path, "k"))
    try:
        killed_after = kill_rank(proc.pid, tmp_path / "k")
        out = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    lines = [l for l in out.splitlines() if "restart 1/1" in l]
    assert len(lines) == 1 and lines[0].startswith("scaletrain: ranks failed (rank 1: killed by SIGKILL)"), out[-4000:]
    step = int(lines[0].rsplit("checkpoint step ", 1)[1])
    assert step >= killed_after
    check_resumed_run(tmp_path / "k", reference)


def test_cli_restart_without_a_checkpoint_starts_over_cleanly(reference, corpus, cache_dir, tmp_path):
    # no checkpoint before the last step: the restart runs from step 0, with the first attempt's metrics gone
    ov = overrides(corpus, cache_dir, tmp_path, "s") + ["train.ckpt_every=0"]
    proc = start_cli("train", "--nproc", "2", "--max-restarts", "1", *ov)
    try:
        kill_rank(proc.pid, tmp_path / "s", when=_trained_step)
        out = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "scaletrain: ranks failed (rank 1: killed by SIGKILL); restart 1/1 from the start (no checkpoint)" in out
    assert losses(tmp_path / "s") == losses(reference)
    evals = [r["step"] for r in read_metrics(tmp_path / "s" / "metrics.jsonl") if "val_loss" in r]
    assert evals == [0, 10, 20, 30]
    assert latest_checkpoint(tmp_path / "s").name == f"step_{STEPS:08d}"


def test_launch_restart_resumes_from_checkpoint(reference, corpus, cache_dir, tmp_path):
    run = launch(overrides=overrides(corpus, cache_dir, tmp_path, "l"), nproc=2, max_restarts=1, echo=False)
    kill_rank(run.proc.pid, run.run_dir)
    assert run.wait(600) == "finished", run.error
    assert run.returncode == 0
    check_resumed_run(run.run_dir, reference)
    rec = json.loads((run.run_dir / "launch.json").read_text())
    assert rec["launches"][-1]["restarts"] == 1 and rec["launches"][-1]["status"] == "finished"
    assert "resumed" in run.logs(0)


def test_a_job_that_keeps_failing_stops_after_n_restarts(corpus, cache_dir, tmp_path):
    # rank 1 dies at start-up on every attempt (a fault planted in the ranks' interpreter start-up)
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('RANK') == '1' and 'TORCHELASTIC_RUN_ID' in os.environ:\n    os._exit(3)\n"
    )
    path = os.pathsep.join([str(plant), os.environ.get("PYTHONPATH", "")])
    r = run_cli(
        "train",
        "--nproc",
        "2",
        "--max-restarts",
        "2",
        *overrides(corpus, cache_dir, tmp_path, "f"),
        env={"PYTHONPATH": path},
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    out = (r.stdout + r.stderr).splitlines()
    ours = [l for l in out if l.startswith("scaletrain: ranks failed")]
    assert ours == [
        "scaletrain: ranks failed (rank 1: exit code 3); restart 1/2 from the start (no checkpoint)",
        "scaletrain: ranks failed (rank 1: exit code 3); restart 2/2 from the start (no checkpoint)",
        "scaletrain: ranks failed (rank 1: exit code 3) after 2 restarts; giving up",
    ], "\n".join(out[-40:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]

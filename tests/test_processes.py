"""Processes under faults: planted pickles, a launcher killed with kill -9, SIGTERM / Ctrl-C on every launch path,
where the rendezvous listens."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
import psutil
import pytest
from conftest import run_cli, tiny, notebook_function
from scaletrain.checkpoint import latest_checkpoint
from scaletrain.errors import LaunchError
from scaletrain.launch import launch, resume
from scaletrain.runlock import RunLock


class _Plant:
    "A pickle that, if unpickled, creates a marker file (stands in for any code an attacker would run)."

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _start_cli(*args) -> subprocess.Popen:
    "`scaletrain ...` in a session of its own, as a terminal would run it in the foreground."
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "scaletrain.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def _wait_training(run_dir: Path, proc, timeout=180):
    "Until metrics.jsonl has a training step (the ranks are past their start)."
    t = time.time()
    while time.time() - t < timeout:
        m = run_dir / "metrics.jsonl"
        if m.exists() and any('"loss"' in l for l in m.read_text().splitlines()):
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError("training did not start")


def _tree(pid) -> list:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def test_planted_pickles_are_not_unpickled(tmp_path):
    fn = notebook_function("def f(ctx, k):\n    return {'rank': ctx.rank, 'k': k}\n", "f")
    run = launch(fn, 7, nproc=1, out_dir=tmp_path, name="fn", echo=False)
    assert run.wait(300) == "finished", run.error
    assert run.results() == [{"rank": 0, "k": 7}]
    marker = tmp_path / "pwned"
    # a result replaced by someone who can write the folder: refused in one line, nothing executed
    (run.run_dir / "results" / "rank0.pkl").write_bytes(pickle.dumps(_Plant(marker)))
    with pytest.raises(LaunchError, match="not signed by this run") as e:
        run.results()
    assert "\n" not in str(e.value) and not marker.exists()
    # a shipped function replaced: the rank refuses it, nothing executed
    (run.run_dir / "function.pkl").write_bytes(pickle.dumps(_Plant(marker)))
    again = resume(run.run_dir, echo=False)
    assert again.wait(300) == "failed"
    assert "refusing to unpickle" in again.error and not marker.exists()


def _assert_stopped_cleanly(proc, out: str, run_dir):
    "Exit 0, no traceback, summary 'stopped', and a checkpoint to resume from."
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"
    assert latest_checkpoint(run_dir) is not None


def test_rendezvous_listens_on_loopback_and_sigterm_stops_cleanly(corpus, cache_dir, tmp_path):
    proc = _start_cli("train", "--nproc", "2", *tiny(corpus, cache_dir, tmp_path, "train.steps=100000", "run.name=t"))
    run_dir = tmp_path / "t"
    try:
        _wait_training(run_dir, proc)
        listening = [
            c.laddr.ip for p in _tree(proc.pid) for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN
        ]
        assert listening and set(listening) <= {"127.0.0.1", "::1"}, listening
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=180)[0]
    finally:
        proc.kill()
    _assert_stopped_cleanly(proc, out, run_dir)


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_checkpoints_and_exits_0(corpus, cache_dir, tmp_path, nproc):
    proc = _start_cli("train", "--nproc", nproc, *tiny(corpus, cache_dir, tmp_path, "train.steps=100000", "run.name=c"))
    run_dir = tmp_path / "c"
    try:
        _wait_training(run_dir, proc)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends to the launcher
        out = proc.communicate(timeout=180)[0]
    finally:
        proc.kill()
    _assert_stopped_cleanly(proc, out, run_dir)


def test_ctrl_c_while_the_ranks_start_is_one_line_and_leaves_no_folder(corpus, cache_dir, tmp_path):
    "A stop between the launch line and the ranks' first step: exit 130, the reason said, the new folder removed."
    proc = _start_cli("train", "--nproc", "2", *tiny(corpus, cache_dir, tmp_path, "train.steps=100000", "run.name=s"))
    try:
        seen = []
        for line in proc.stdout:  # torchrun and its ranks take seconds to start after this line
            seen.append(line)
            if line.startswith("scaletrain: launching 2 processes"):
                break
        assert (tmp_path / "s" / "config.yaml").is_file(), seen
        time.sleep(1)  # torchrun is starting (its ranks take several seconds to reach a step on 2 cores)
        proc.send_signal(signal.SIGINT)
        out = "".join(seen) + proc.communicate(timeout=180)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    assert "Traceback" not in out and "scaletrain: stopped" in out, out[-3000:]
    assert f"removed {tmp_path / 's'}: the run was stopped before its first step" in out, out[-3000:]
    assert not (tmp_path / "s").exists()


def test_run_stop_from_python_checkpoints_and_exits_0(corpus, cache_dir, tmp_path):
    run = launch(overrides=tiny(corpus, cache_dir, tmp_path, "train.steps=100000", "run.name=p"), nproc=2, echo=False)
    t = time.time()
    while not run.records and time.time() - t < 180 and not run.done:
        time.sleep(0.2)
    assert run.stop(timeout=120) == "stopped"
    assert run.returncode == 0, run.logs(0, tail=30)
    assert run.summary["status"] == "stopped" and latest_checkpoint(run.run_dir) is not None


def test_killed_launcher_takes_its_ranks_down(corpus, cache_dir, tmp_path):
    proc = _start_cli("train", "--nproc", "2", *tiny(corpus, cache_dir, tmp_path, "train.steps=100000", "run.name=k"))
    run_dir = tmp_path / "k"
    try:
        _wait_training(run_dir, proc)
        tree = _tree(proc.pid)
        assert len(tree) >= 4  # launcher, torchrun, 2 ranks
        proc.kill()  # kill -9: the launcher can pass nothing on
        proc.wait()
        gone, alive = psutil.wait_procs(tree[1:], timeout=120)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        proc.kill()
    assert RunLock.writers(run_dir) == []
    assert latest_checkpoint(run_dir) is not None  # the ranks got SIGTERM: they checkpointed on the way out
    r = run_cli("train", "--resume", run_dir, "train.steps=" + str(int(latest_checkpoint(run_dir).name[5:]) + 2))
    assert r.returncode == 0, r.stderr[-3000:]


def test_lock_counts_processes_still_writing(tmp_path):
    "A lock whose launcher is gone is still live while a process of the job (`--run-dir` the folder) runs."
    d = tmp_path / "w"
    d.mkdir()
    (d / "launch.lock").write_text(json.dumps(dict(pid=2**22 + 1, start="1", host=os.uname().nodename, time="x")))
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--run-dir", str(d)])
    try:
        t = time.time()
        while not RunLock.writers(d) and time.time() - t < 30:
            time.sleep(0.1)
        with pytest.raises(LaunchError, match=f"still being written by pid {writer.pid}") as e:
            RunLock(d)
        assert "\n" not in str(e.value)
    finally:
        writer.kill()
        writer.wait()
    with RunLock(d) as lock:  # the writer gone: the stale lock is taken over
        assert lock.holder()["pid"] == os.getpid()

"""The launcher: torchrun as a subprocess, notebook functions shipped by value, stop/resume, multi-node on one machine,
bad input."""

import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
import pytest
import torch
import torch.distributed as dist
from conftest import run_cli, tiny, notebook_function
from scaletrain.checkpoint import latest_checkpoint, load_model_weights
from scaletrain.config import load_config
from scaletrain.errors import LaunchError
from scaletrain.launch import launch, multinode, resume
from scaletrain.procs import free_port
from scaletrain.runlock import RunLock
from scaletrain.metrics import read_metrics
from scaletrain.models.gpt import GPT


def losses(run_dir):
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def weights(run_dir):
    cfg = load_config(Path(run_dir) / "config.yaml")
    cfg.model.vocab_size = 257
    m = GPT(cfg.model)
    load_model_weights(run_dir, m)
    return m.state_dict()


STEPS = 80


def lm_overrides(corpus, cache_dir, out, name, *extra):
    # 64 wide rather than tiny()'s 32: steps slow enough that stop() lands mid-run even on a fast machine
    return tiny(
        corpus,
        cache_dir,
        out,
        f"run.name={name}",
        f"train.steps={STEPS}",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "model.dropout=0.1",
        "model.n_embd=64",
        "model.block_size=64",
        "train.micro_batch=8",
        *extra,
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus, cache_dir):
    "An uninterrupted 2-process DDP run (gloo): the reference for stop/resume and multi-node."
    out = tmp_path_factory.mktemp("launch_runs")
    run = launch(overrides=lm_overrides(corpus, cache_dir, out, "straight"), nproc=2)
    assert run.wait(600) == "finished", run.error
    return run


def test_function_shipped_by_value_runs_on_both_ranks(tmp_path, capsys, monkeypatch):
    # the parent has touched torch.distributed and carries torchrun variables, as a notebook kernel might
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("WORLD_SIZE", "9")
    monkeypatch.setenv("MASTER_PORT", "1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fn = notebook_function(
            "import os\n"
            "def probe(ctx, scale):\n"
            "    import torch, torch.distributed as dist\n"
            "    t = torch.tensor([float(ctx.rank + 1)])\n"
            "    dist.all_reduce(t)\n"
            "    print(f'hello from rank {ctx.rank}')\n"
            "    return dict(rank=ctx.rank, world=ctx.world_size, total=t.item() * scale, pid=os.getpid(),\n"
            "                backend=dist.get_backend(), resume=ctx.resume)\n",
            "probe",
        )
        run = launch(fn, 10, nproc=2, out_dir=tmp_path, name="fn")
        assert run.wait(300) == "finished", run.error
    finally:
        dist.destroy_process_group()
    res = run.results()
    assert [(r["rank"], r["world"], r["total"], r["backend"], r["resume"]) for r in res] == [
        (0, 2, 30.0, "gloo", False),
        (1, 2, 30.0, "gloo", False),
    ]
    assert len({r["pid"] for r in res} | {os.getpid()}) == 3
    assert "hello from rank 0" in run.logs(0) and "hello from rank 1" in run.logs(1)
    out = capsys.readouterr().out
    assert "[rank 0] hello from rank 0" in out and "[rank 1]" not in out  # rank 0 only by default
    assert "--master-addr" in run.cmd and run.cmd[run.cmd.index("--master-addr") + 1] == "127.0.0.1"
    assert not (run.run_dir / "launch.lock").exists()
    rec = json.loads((run.run_dir / "launch.json").read_text())
    assert rec["kind"] == "function" and rec["launches"][-1]["status"] == "finished"


def test_stop_then_resume_matches_uninterrupted(straight, tmp_path, corpus, cache_dir):
    s = straight.summary
    assert s["status"] == "finished" and s["world_size"] == 2 and s["strategy"] == "ddp" and s["steps"] == STEPS
    run = launch(overrides=lm_overrides(corpus, cache_dir, tmp_path, "interrupted"), nproc=2)
    while run.last_step() < 3 and not run.done:
        time.sleep(0.05)
    assert run.stop(timeout=120) == "stopped", run.error
    summary = run.summary
    assert summary["status"] == "stopped" and 3 <= summary["steps"] < STEPS
    exits = [json.loads(p.read_text()) for p in sorted(run.logs_dir.glob("rank*.exit.json"))]
    assert [e["rc"] for e in exits] == [0, 0]  # both ranks checkpointed and exited 0
    assert latest_checkpoint(run.run_dir).name == f"step_{summary['steps']:08d}"
    again = run.resume()
    with pytest.raises(LaunchError, match="is in use by a running job"):
        resume(run.run_dir)  # a second launch into it
    assert again.wait(600) == "finished", again.error
    assert losses(run.run_dir) == losses(straight.run_dir) and len(losses(run.run_dir)) == STEPS
    assert run.summary["final_val_loss"] == straight.summary["final_val_loss"]
    a, b = weights(run.run_dir), weights(straight.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "resumed" in run.logs(0)


def test_resume_refused_while_folder_in_use(straight):
    lock = RunLock(straight.run_dir, pid=os.getpid())  # a live process holds the folder
    try:
        with pytest.raises(LaunchError, match="in use by a running job"):
            resume(straight.run_dir)
        r = run_cli("train", "--resume", straight.run_dir)
        assert (
            r.returncode == 2
            and r.stderr.startswith("scaletrain: error: run folder")
            and len(r.stderr.strip().splitlines()) == 1
        )
    finally:
        lock.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    RunLock(straight.run_dir, pid=dead.pid)  # a lock whose process is gone is stale ...
    RunLock(straight.run_dir).release()  # ... and is taken over


def test_multinode_on_one_machine(straight, tmp_path, corpus, cache_dir):
    ep = f"127.0.0.1:{free_port()}"
    mn = multinode(
        None, overrides=lm_overrides(corpus, cache_dir, tmp_path, "twonodes"), nnodes=2, nproc=1, rdzv_endpoint=ep
    )
    text = str(mn)
    assert "# node 0" in text and "# node 1" in text and shlex.join(mn.command(1)) in text
    for c in mn.commands:
        assert (
            c[c.index("--nnodes") + 1] == "2"
            and c[c.index("--rdzv-backend") + 1] == "c10d"
            and c[c.index("--rdzv-endpoint") + 1] == ep
        )
    nodes = [mn.start(0), mn.start(1, echo=False)]
    assert [n.wait(600) for n in nodes] == ["finished", "finished"], [n.error for n in nodes]
    s = json.loads((mn.run_dir / "summary.json").read_text())
    assert s["world_size"] == 2 and s["status"] == "finished"
    # two nodes of one process each train exactly like one node of two processes
    assert losses(mn.run_dir) == losses(straight.run_dir)
    assert (mn.run_dir / "logs" / "rank0.log").exists() and (mn.run_dir / "logs" / "rank1.log").exists()
    # the same commands run again (resubmitted, or a SLURM requeue) continue the run: here finished, so nothing
    # is trained again and metrics.jsonl keeps one record per step
    assert all("--resume-if-saved" in c for c in mn.commands) and "--resume-if-saved" in mn.slurm_script()
    before = (mn.run_dir / "metrics.jsonl").read_text()
    again = [mn.start(0, echo=False), mn.start(1, echo=False)]
    assert [n.wait(600) for n in again] == ["finished", "finished"], [n.error for n in again]
    assert (mn.run_dir / "metrics.jsonl").read_text() == before
    assert "is finished at step" in again[0].logs(0)


def test_slurm_script_runs_under_a_fake_slurm(tmp_path):
    "The generated batch script, run with stand-ins for srun and scontrol that start its command once per 'node'."
    fn = notebook_function(
        "def where(ctx):\n    import torch.distributed as dist\n    dist.barrier()\n"
        "    return (ctx.rank, ctx.world_size, ctx.node_rank)\n",
        "where",
    )
    mn = multinode(fn, nnodes=2, nproc=1, rdzv_endpoint=f"127.0.0.1:{free_port()}", out_dir=tmp_path, name="slurm")
    script = mn.write_slurm(gpus_per_node=0, partition="debug", time_limit="00:05:00")
    text = script.read_text()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=0",
        "#SBATCH --partition=debug",
        "#SBATCH --time=00:05:00",
        "--rdzv-backend c10d",
    ):
        assert line in text, line
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (bin_ / "srun").write_text(
        "#!/bin/bash\nshift  # --kill-on-bad-exit\nfor n in 0 1; do SLURM_NODEID=$n \"$@\" & done\nwait\n"
    )
    for f in bin_.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_NODELIST="x", SLURM_JOB_ID="4242")
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    from scaletrain.worker import run_key, signed_load

    res = [signed_load(mn.run_dir / "results" / f"rank{i}.pkl", run_key(mn.run_dir)) for i in range(2)]
    assert sorted(x[:2] for x in res) == [(0, 2), (1, 2)] and sorted(x[2] for x in res) == [0, 1]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LaunchError, match=f"master_port={port}: port {port} on 127.0.0.1 is already in use"):
            launch(print, nproc=2, master_port=port, out_dir=tmp_path)
        with pytest.raises(LaunchError, match="is already in use on this machine"):
            multinode(print, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", out_dir=tmp_path)
    with pytest.raises(LaunchError, match="script 'nope.py': no such file"):
        launch("nope.py", out_dir=tmp_path)
    gen = (i for i in range(3))
    f = notebook_function("def uses(ctx):\n    return next(gen)\n", "uses")
    f.__globals__["gen"] = gen
    with pytest.raises(
        LaunchError,
        match=r"function uses: cannot be shipped to the ranks \(TypeError: cannot pickle 'generator' object\)",
    ):
        launch(f, out_dir=tmp_path)
    with pytest.raises(LaunchError, match="nproc=0: must be a whole number >= 1"):
        launch(print, nproc=0, out_dir=tmp_path)
    with pytest.raises(LaunchError, match="rdzv_endpoint='': a multi-node job needs HOST:PORT"):
        launch(print, nnodes=2, out_dir=tmp_path)
    with pytest.raises(LaunchError, match="expected HOST:PORT"):
        multinode(print, rdzv_endpoint="nohost", out_dir=tmp_path)
    # the run folder's name and place, whose output to show, the rendezvous host: refused before a folder exists
    with pytest.raises(LaunchError, match=r"name='a/b': must be a single folder name under out_dir"):
        launch(print, name="a/b", out_dir=tmp_path)
    with pytest.raises(LaunchError, match=r"name=7: expected a folder name"):
        launch(print, name=7, out_dir=tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(LaunchError, match=r"out_dir=.*a_file/runs: .*a_file is not a folder"):
        launch(print, out_dir=tmp_path / "a_file" / "runs")
    (tmp_path / "a_file").unlink()
    for ranks, want in (
        ("foo", r"ranks='foo': expected 'all', 'none', a rank or a list of ranks"),
        (5, r"ranks=5: no such rank; this job's ranks are 0..1 \(or 'all', 'none'\)"),
        ([0, -1], r"ranks=\[0, -1\]: no such rank"),
        (True, r"ranks=True: expected"),
    ):
        with pytest.raises(LaunchError, match=want):
            launch(print, nproc=2, ranks=ranks, out_dir=tmp_path)
    for addr in ("", "a b", "host:29500"):
        with pytest.raises(LaunchError, match=f"master_addr={addr!r}: expected a host name or IP address"):
            launch(print, master_addr=addr, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())
    with pytest.raises(LaunchError, match="not a run folder"):
        resume(tmp_path / "none")
    # the same through the CLI: exit code 2 and one line, nothing written
    (tmp_path / "user.py").write_text("print('hi')\n")
    for args, line in (
        (["--nproc", "2", tmp_path / "nope.py"], f"script '{tmp_path / 'nope.py'}': no such file"),
        (["--name", "a/b", tmp_path / "user.py"], "name='a/b': must be a single folder name under out_dir"),
        (["--nproc", "2", "--ranks", "5", tmp_path / "user.py"], "ranks='5': no such rank; this job's ranks are 0..1"),
        (["--master-addr", "", tmp_path / "user.py"], "master_addr='': expected a host name or IP address"),
    ):
        r = run_cli("launch", *args, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"scaletrain: error: {line}"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user.py"]


SCRIPT = """
import os, signal, sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
t = torch.tensor([rank + 1.0]); dist.all_reduce(t)
print(f"script rank {rank}: args {sys.argv[1:]} sum {t.item()} resume {os.environ['SCALETRAIN_RESUME']}", flush=True)
open(os.path.join(os.environ["SCALETRAIN_RUN_DIR"], f"ready{rank}"), "w").close()
for _ in range(600):
    if stop: break
    time.sleep(0.1)
print(f"script rank {rank}: graceful exit" if stop else "timeout", flush=True)
dist.destroy_process_group()
"""


def test_cli_launches_a_script_and_sigterm_stops_it(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    out = tmp_path / "runs"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scaletrain.cli",
            "launch",
            "--nproc",
            "2",
            "--ranks",
            "all",
            "--out-dir",
            str(out),
            "--name",
            "s",
            str(script),
            "--lr",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    run_dir = out / "s"
    for _ in range(1200):
        if (run_dir / "ready0").exists() and (run_dir / "ready1").exists() or p.poll() is not None:
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stdout + stderr
    for r in (0, 1):
        assert f"[rank {r}] script rank {r}: args ['--lr', '0.5'] sum 3.0 resume 0" in stdout
        assert f"[rank {r}] script rank {r}: graceful exit" in stdout
    assert stdout.strip().endswith("stopped")
    # print the commands and write a SLURM script for two nodes, without running anything
    r = run_cli(
        "launch",
        "--nnodes",
        "2",
        "--nproc",
        "4",
        "--rdzv-endpoint",
        "node0:29400",
        "--print-commands",
        "--slurm",
        tmp_path / "job.sh",
        "--out-dir",
        out,
        "--name",
        "big",
        script,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("torch.distributed.run") == 2 and "--rdzv-endpoint node0:29400" in r.stdout
    assert (
        "#SBATCH --nodes=2" in (tmp_path / "job.sh").read_text()
        and "#SBATCH --gpus-per-node=4" in (tmp_path / "job.sh").read_text()
    )


def test_a_refusal_in_the_users_script_is_one_line_naming_its_line(tmp_path):
    """A scaletrain refusal raised inside a launched script (here `loop.setup` meeting a misspelt key) is the user's
    mistake, not a crash: the rank prints one line ending with the script's line that asked, records it as its
    error, and `scaletrain launch` exits 2; a crash in the user's own code stays a traceback with exit code 1."""
    (tmp_path / "bad.py").write_text(
        "import torch\n"
        "from scaletrain.loop import setup\n"
        "m = torch.nn.Linear(2, 2)\n"
        "loop = setup(m, torch.optim.SGD(m.parameters(), lr=0.1), overrides=['memory.precison=bf16-mixed'])\n"
    )
    (tmp_path / "crash.py").write_text("x = 1\nraise RuntimeError('my own bug')\n")
    r = run_cli("launch", "--out-dir", tmp_path / "runs", "--name", "bad", tmp_path / "bad.py", cwd=tmp_path)
    want = "scaletrain: error: config: unknown key 'memory.precison' (did you mean 'memory.precision'?) (at bad.py:4)"
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert f"[rank 0] {want}" in r.stdout.splitlines() and r.stderr.strip().endswith(want), r.stdout + r.stderr
    rec = json.loads((tmp_path / "runs" / "bad" / "logs" / "rank0.exit.json").read_text())
    assert (rec["rc"], rec["error"]) == (2, want)
    r = run_cli("launch", "--out-dir", tmp_path / "runs", "--name", "crash", tmp_path / "crash.py", cwd=tmp_path)
    assert r.returncode == 1 and "RuntimeError: my own bug" in r.stderr and "Traceback" in r.stderr, r.stderr


def test_slurm_values_that_a_batch_line_cannot_carry_are_refused_before_anything_is_made(tmp_path):
    "A #SBATCH line is not shell-quoted: a newline in --partition would be a command in the script."
    base = ["launch", "--nnodes", "2", "--nproc", "2", "--rdzv-endpoint", "node0:29400", "--out-dir", tmp_path]
    for extra, expect in (
        (["--partition", "gpu\nrm -rf $HOME"], "--partition='gpu\\nrm -rf $HOME': expected a Slurm partition name"),
        (["--time", "bogus time"], "--time='bogus time': expected a Slurm time limit"),
        (["--name", "a%j b"], "a SLURM script's #SBATCH --output cannot hold spaces, quotes, %"),
    ):
        r = run_cli(
            *base, "--slurm", tmp_path / "job.sh", *(["--name", "ok"] if "--name" not in extra else []), *extra, "train"
        )
        assert r.returncode == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not any(tmp_path.iterdir())  # no run folder, no script
    # accepted forms; --max-restarts reaches torchrun on every node and in the script; Slurm's log folder exists
    r = run_cli(
        *base,
        "--slurm",
        tmp_path / "job.sh",
        "--name",
        "ok",
        "--partition",
        "gpu,debug",
        "--time",
        "2-12:00:00",
        "--max-restarts",
        "3",
        "--print-commands",
        "train",
    )
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "job.sh").read_text()
    assert "#SBATCH --partition=gpu,debug" in text and "#SBATCH --time=2-12:00:00" in text
    assert "--max-restarts 3" in text and r.stdout.count("--max-restarts 3") == 2
    assert (tmp_path / "ok" / "logs").is_dir()
    assert json.loads((tmp_path / "ok" / "launch.json").read_text())["spec"]["max_restarts"] == 3

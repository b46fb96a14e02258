"The launch panel, headless: set the controls, click the buttons, check what was launched and what the panel shows."

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
import pytest
from scaletrain.config import load_config
from scaletrain.errors import ConfigError
from scaletrain.launch import launch
from scaletrain.models.spec import get_spec
from scaletrain.errors import LaunchError
from scaletrain.procs import pid_alive, proc_start
from scaletrain.runs import Run, folder_status
from scaletrain.registry import shape_families
from scaletrain.widgets import (
    LaunchPanel,
    curves_figure,
    duration,
    list_runs,
    progress_text,
    runs_table_html,
)
from conftest import notebook_function, tiny


def base(corpus, cache_dir):
    return [
        f"data.source={corpus}",
        f"data.cache_dir={cache_dir}",
        "train.device=cpu",
        "train.eval_every=0",
        "train.eval_iters=2",
        "train.ckpt_every=0",
    ]


def test_panel_launch_stop_resume(tmp_path, corpus, cache_dir):
    out = tmp_path / "runs"
    panel = LaunchPanel(overrides=base(corpus, cache_dir), out_dir=out, model="tiny", steps=10)
    panel.nproc.value = 2
    panel.steps.value = 60
    panel.micro_batch.value = 8
    panel.lr.value = 3e-3
    panel.precision.value = "fp32"
    panel.strategy.value = "ddp"
    assert panel.family.value == "llama"  # the config's default family
    panel.family.value = "gpt"
    assert panel.fits and "predicted memory per rank" in panel.memory.value
    panel.launch_button.click()
    run = panel.run
    assert run is not None and panel.state == "running", panel.status.value
    assert panel.launch_button.disabled and not panel.stop_button.disabled and panel.resume_button.disabled
    c = run.cmd
    assert c[c.index("--nproc-per-node") + 1] == "2" and c[c.index("--master-addr") + 1] == "127.0.0.1"
    assert c[-3:-1] == ["_rank", "--run-dir"] and Path(c[-1]).parent == out.resolve()
    cfg = load_config(run.run_dir / "config.yaml")
    assert (
        cfg.train.steps,
        cfg.train.micro_batch,
        cfg.train.lr,
        cfg.parallel.strategy,
        cfg.model.family,
        cfg.model.n_layer,
        cfg.model.n_embd,
    ) == (60, 8, 3e-3, "ddp", "gpt", 2, 64)
    panel.launch_button.click()  # a second launch while one runs is refused in the status line
    assert panel.state == "error" and "still running" in panel.status.value and panel.run is run
    while run.last_step() < 3 and not run.done:
        run.wait(0.05)
    panel.stop_button.click()
    assert run.wait(300) == "stopped", run.error
    assert panel.state == "stopped" and not panel.resume_button.disabled and not panel.launch_button.disabled
    stopped_at = run.summary["steps"]
    assert 3 <= stopped_at < 60
    assert "ETA" not in panel.progress_label.value  # a stopped run has no time left to guess
    panel.steps.value = 80  # resumed to more steps: the progress counts to the new total
    panel.resume_button.click()
    again = panel.run
    assert again is not run and again.resumed and "--resume" in again.cmd and panel.state == "running"
    assert panel.progress.max == 80 and "/80" in panel.progress_label.value
    assert again.wait(300) == "finished", again.error
    assert panel.state == "finished" and "step 80/80" in panel.status.value and panel.progress.value == 80
    assert panel.plot_points == 80 and panel.plot.value[:4] == b"\x89PNG" and "80 points" in panel.plot_caption.value
    assert "resumed" in panel.log_pane.value
    assert run.run_dir.name in panel.runs_table.value and "finished" in panel.runs_table.value
    panel.compare.value = (run.run_dir.name,)
    panel.compare_button.click()
    assert panel.compare_plot.value[:4] == b"\x89PNG"


def test_panel_shows_a_crashed_rank(tmp_path):
    "Rank 1 raises; the run is marked failed, its traceback is in the panel and rank 0 was stopped."
    crash = notebook_function(
        "def crash(ctx):\n"
        "    import torch.distributed as dist\n"
        "    dist.barrier()\n"
        "    if ctx.rank == 1: 1 / 0\n"
        "    dist.barrier()  # rank 0 waits here until the job is stopped\n"
        "    return 'unreachable'\n",
        "crash",
    )
    panel = LaunchPanel(out_dir=tmp_path / "runs", model="tiny")
    run = panel.watch(launch(crash, nproc=2, out_dir=tmp_path / "runs", name="crash", echo=False))
    assert run.wait(300) == "failed"
    assert run.error.startswith("rank 1 failed (exit code 1)") and "ZeroDivisionError: division by zero" in run.error
    assert panel.state == "failed" and "ZeroDivisionError" in panel.status.value
    assert "Traceback (most recent call last)" in panel.log_pane.value and ", in crash" in panel.log_pane.value
    assert run.results() == [None, None]
    pid0 = int((run.logs_dir / "rank0.pid").read_text())
    assert not pid_alive(pid0)
    assert json.loads((run.run_dir / "launch.json").read_text())["launches"][-1]["status"] == "failed"
    assert "crash" in panel.runs_table.value and "failed" in panel.runs_table.value


def test_panel_bad_settings_do_not_launch_and_multinode_prepares(tmp_path, corpus, cache_dir):
    panel = LaunchPanel(overrides=base(corpus, cache_dir), out_dir=tmp_path / "runs", model="tiny")
    panel.model.value = "gpt2-xl"
    panel.nproc.value = 1
    panel.micro_batch.value = 64
    assert not panel.fits and "will not fit" in panel.memory.value and "1.48 B parameters" in panel.memory.value
    one = dict(panel.prediction)
    panel.strategy.value = "fsdp"
    panel.nproc.value = 8  # model states sharded 8 ways
    assert panel.prediction["params"] * 8 == pytest.approx(one["params"]) and panel.prediction[
        "optimizer"
    ] * 8 == pytest.approx(one["optimizer"])
    panel.act_ckpt.value = "full"
    assert panel.prediction["activations"] < one["activations"] / 4
    # the prediction is the estimator's for the selected family's shape
    panel.model.value = "medium"
    totals = {}
    for fam in shape_families():  # hf's shape is its model.hf_path folder's
        panel.family.value = fam
        assert panel.config().model.family == fam
        assert panel.prediction["n_params"] == get_spec(fam).shape(panel.config().model).n_params()
        totals[fam] = panel.prediction["total"]
    assert len(set(totals.values())) == len(totals)  # the families' shapes differ, so do their predictions
    assert LaunchPanel(overrides=["model.family=gpt"], out_dir=tmp_path / "runs").family.value == "gpt"
    panel.model.value = "tiny"
    panel.steps.value = 5
    panel.nnodes.value = 2
    panel.launch_button.click()
    assert panel.state == "error" and "rdzv_endpoint" in panel.status.value and panel.run is None
    panel.nnodes.value = 1
    panel.nproc.value = 3
    panel.strategy.value = "ddp"
    panel.base.append("parallel.tp=2")
    panel.launch_button.click()
    assert panel.state == "error" and "not divisible" in panel.status.value and panel.run is None
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    # several nodes: Launch prepares the run folder, shows each node's command and writes a SLURM script
    panel.base.remove("parallel.tp=2")
    panel.nproc.value = 4
    panel.nnodes.value = 2
    assert panel.rdzv.layout.display is None  # the rendezvous field appears for several nodes
    panel.rdzv.value = "node0.cluster:29400"
    panel.launch_button.click()
    assert panel.state == "prepared" and panel.run is None, panel.status.value
    (folder,) = (tmp_path / "runs").iterdir()
    log = panel.log_pane.value
    assert (
        log.count("torch.distributed.run") == 3
        and "--rdzv-endpoint node0.cluster:29400" in log
        and "#SBATCH --nodes=2" in log
    )
    assert "#SBATCH --gpus-per-node=4" in (folder / "slurm.sh").read_text() and (folder / "config.yaml").exists()


def test_log_lines_of_a_burst_all_reach_the_pane(tmp_path):
    # lines closer together than the half-second redraw interval are shown once it is over, not held back
    import time

    panel = LaunchPanel(out_dir=tmp_path / "runs", model="tiny")
    panel._on_line(0, "first line")
    panel._on_line(0, "second line")
    panel._on_line(0, "third line")
    assert "third line" not in panel.log_pane.value  # redrawn at most every 0.5 s
    time.sleep(1.0)
    assert all(s in panel.log_pane.value for s in ("first line", "second line", "third line"))


# ---- runs that outlive the kernel: re-attaching, lost runs ----

LAUNCHER = """
import sys
from scaletrain.launch import launch
run = launch(None, overrides=sys.argv[2:], nproc=1, detach=sys.argv[1] == "detach", echo=False)
while run.last_step() < 2 and not run.done:
    run.wait(0.05)
print(run.run_dir, flush=True)
"""  # a "kernel" that launches, sees the job start, and goes away (exits) without stopping it


def launch_and_leave(tmp_path, corpus, cache_dir, name, mode="detach", steps=100000):
    "Launch a 1-process training from a Python process that then exits, as a kernel restart does; its run folder."
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    ov = tiny(corpus, cache_dir, tmp_path / "runs", f"run.name={name}", f"train.steps={steps}", "train.eval_every=0")
    ov += ["train.ckpt_every=0", "run.log_every=1"]
    r = subprocess.run(
        [sys.executable, str(script), mode, *ov], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip().splitlines()[-1])


def kill_job(run_dir: Path):
    "SIGKILL the job's torchrun and its ranks (each leads a session of its own), as the OOM killer or a crash would."
    pid = json.loads((run_dir / "launch.json").read_text())["launches"][-1]["pid"]
    ranks = [int(p.read_text()) for p in (run_dir / "logs").glob("rank*.pid")]
    for p in [*ranks, pid]:
        try:
            os.killpg(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in [*ranks, pid]:
        while pid_alive(p):
            time.sleep(0.05)


def test_a_new_panel_follows_a_detached_run_and_stops_it(tmp_path, corpus, cache_dir):
    d = launch_and_leave(tmp_path, corpus, cache_dir, "survivor")
    assert folder_status(d) == "running"  # its launcher is gone; the job is not
    panel = LaunchPanel(out_dir=tmp_path / "runs", model="tiny")
    run = panel.run
    assert run is not None and run.attached and run.run_dir == d.resolve(), panel.status.value
    assert panel.state == "running" and "followed again" in panel.status.value and not panel.stop_button.disabled
    assert "survivor" in panel.runs_table.value and "data-status='running'" in panel.runs_table.value
    n = run.last_step()
    while run.last_step() < n + 3:  # its metrics are followed: the records from step 1 on, and new ones
        assert not run.done, run.error
        run.wait(0.05)
    steps = [r["step"] for r in run.records if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))
    assert panel.progress_box.layout.display is None and "step " in panel.progress_label.value
    assert "/100000" in panel.progress_label.value and "ETA" in panel.progress_label.value
    # the log of this launch from its start (the trainer's first lines), not only what came after attaching
    assert any("step" in line for _, line in run.lines)
    panel.stop_button.click()
    assert run.wait(120) == "stopped", run.error
    assert panel.state == "stopped" and run.summary["status"] == "stopped"
    last = json.loads((d / "launch.json").read_text())["launches"][-1]
    assert last["status"] == "stopped" and "end" in last  # the attached watcher records the end
    assert not (d / "launch.lock").exists() and folder_status(d) == "stopped"
    assert not panel.resume_button.disabled and not panel.launch_button.disabled


def test_a_killed_run_is_lost_with_how_to_resume(tmp_path, corpus, cache_dir):
    d = launch_and_leave(tmp_path, corpus, cache_dir, "victim")
    run = Run.attach(d, echo=False)
    assert run.status == "running"
    kill_job(d)
    assert run.wait(60) == "lost"
    assert "--resume" in run.error and str(d.resolve()) in run.error
    assert folder_status(d) == "lost"
    # killed with nobody watching: its launch record still says running, its process is gone
    d2 = launch_and_leave(tmp_path, corpus, cache_dir, "unwatched")
    kill_job(d2)
    assert json.loads((d2 / "launch.json").read_text())["launches"][-1]["status"] == "running"
    assert folder_status(d2) == "lost"
    rows = {r["run"]: r for r in list_runs(tmp_path / "runs")}
    assert rows["unwatched"]["status"] == "lost" and rows["victim"]["status"] == "lost"
    table = runs_table_html(list(rows.values()))
    assert table.count("class='scaletrain-lost'") == 2 and f"scaletrain launch --resume {d2}" in table
    with pytest.raises(LaunchError, match="no job of this machine is running there"):
        Run.attach(d2)
    panel = LaunchPanel(out_dir=tmp_path / "runs", model="tiny")
    assert panel.run is None and "is lost" in panel.runs_table.value  # nothing live to follow


def test_a_launcher_that_is_not_detached_takes_its_job_along(tmp_path, corpus, cache_dir):
    d = launch_and_leave(tmp_path, corpus, cache_dir, "attached-to-kernel", mode="stay")
    pid = json.loads((d / "launch.json").read_text())["launches"][-1]["pid"]
    for _ in range(600):
        if not pid_alive(pid):
            break
        time.sleep(0.1)
    assert not pid_alive(pid)  # the default: the job dies with its launcher (ranks with it)


def test_a_reused_pid_is_not_a_live_run(tmp_path):
    "A lock naming a pid that now belongs to another process (same pid, other start time) is stale."
    d = tmp_path / "runs" / "old"
    d.mkdir(parents=True)
    me = os.getpid()
    (d / "launch.json").write_text(json.dumps(dict(kind="train", launches=[dict(start=time.time(), pid=me, cmd=[])])))
    lock = dict(pid=me, start=str(int(proc_start(me)) + 7), host=socket.gethostname(), time="")
    (d / "launch.lock").write_text(json.dumps(lock))
    assert pid_alive(me) and not pid_alive(me, lock["start"])
    assert folder_status(d) == "lost"
    with pytest.raises(LaunchError, match="status: lost"):
        Run.attach(d)
    (d / "launch.lock").write_text(json.dumps(dict(lock, start=proc_start(me))))  # the same process: live
    assert folder_status(d) == "running"


def test_progress_text_and_eta():
    recs = [dict(step=1, loss=3.0, time=2.0), dict(val_loss=2.9, step=1), dict(step=21, loss=2.0, time=12.0)]
    assert progress_text(recs, 101) == (21, "step 21/101 · 21% · ETA 0:40")  # 0.5 s a step, 80 steps to go
    assert progress_text(recs, 101, running=False) == (21, "step 21/101 · 21%")  # stopped: no ETA
    assert progress_text([dict(step=1, loss=3.0, time=2.0)], 10) == (1, "step 1/10 · 10%")  # one point: no rate yet
    assert progress_text(recs[:1] + [dict(step=10, loss=1.0, time=3.0)], 10) == (10, "step 10/10 · 100%")
    assert progress_text([], 10) == (0, "step 0/10")
    assert duration(3725) == "1:02:05" and duration(65) == "1:05"


def test_table_has_wall_time_mfu_and_peak_memory(tmp_path):
    d = tmp_path / "runs" / "done"
    d.mkdir(parents=True)
    t0 = time.time() - 100
    (d / "launch.json").write_text(
        json.dumps(dict(kind="train", launches=[dict(start=t0, pid=1, cmd=[], status="finished", end=t0 + 70)]))
    )
    recs = [dict(step=i, loss=3.0 - i / 10, mfu=0.01 * i, peak_mem_gb=0.25 * i, time=float(i)) for i in (1, 2, 3)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "summary.json").write_text(
        json.dumps(dict(status="finished", wall_time_s=65.2, mfu=0.025, tokens_per_s=1234.0, world_size=2))
    )
    (row,) = list_runs(tmp_path / "runs")
    assert (row["status"], row["wall_s"], row["mfu"], row["peak_mem_gb"]) == ("finished", 65.2, 0.025, 0.75)
    table = runs_table_html([row])
    for col in ("wall time", "MFU", "peak memory"):
        assert f">{col}</th>" in table
    assert ">1:05<" in table and ">2.50%<" in table and ">0.75 GiB<" in table and ">1,234<" in table
    # while it runs: the records' mean MFU (past the first step) and time so far
    (d / "summary.json").unlink()
    (d / "launch.lock").write_text(
        json.dumps(dict(pid=os.getpid(), start=proc_start(os.getpid()), host=socket.gethostname()))
    )
    (row,) = list_runs(tmp_path / "runs")
    assert row["status"] == "running" and row["wall_s"] == 3.0 and row["mfu"] == pytest.approx(0.025)


def test_plot_hidden_until_the_first_points_and_axes_have_units(tmp_path):
    panel = LaunchPanel(out_dir=tmp_path / "runs", model="tiny")
    assert panel.plot.layout.display == "none" and panel.plot.value == b""  # no broken-image icon before a plot
    assert panel.compare_plot.layout.display == "none" and panel.progress_box.layout.display == "none"
    panel.records = [
        dict(step=i, loss=3.0 - i / 10, tokens_per_s=100.0, peak_mem_gb=0.1, time=float(i)) for i in (1, 2)
    ]
    panel.redraw()
    assert panel.plot.layout.display is None and panel.plot.value[:4] == b"\x89PNG" and panel.plot_points == 2
    fig = curves_figure({"a": panel.records})
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
    assert labels == [
        ("optimizer step", "loss (cross-entropy, nats/token)"),
        ("optimizer step", "throughput (tokens/s)"),
        ("optimizer step", "peak memory of rank 0 (GiB)"),
    ]


def test_errors_are_one_line_in_the_panel(tmp_path, monkeypatch, capsys):
    import scaletrain.widgets as widgets

    panel = LaunchPanel(out_dir=tmp_path / "runs", model="tiny")

    def broken(*a, **kw):
        raise RuntimeError("the disk caught fire\nsecond line of the message")

    monkeypatch.setattr(widgets, "launch", broken)
    panel.launch_button.click()  # no exception reaches the notebook
    assert panel.state == "error" and panel.run is None
    assert "RuntimeError: the disk caught fire" in panel.status.value and "second line" not in panel.status.value
    assert "Traceback" in panel.log_pane.value  # the details, inside the panel
    monkeypatch.setattr(widgets, "launch", lambda *a, **kw: (_ for _ in ()).throw(LaunchError("bad layout\nmore")))
    panel.launch_button.click()
    assert "bad layout" in panel.status.value and "more" not in panel.status.value
    panel._on_metrics([dict(step="x", loss=None)])  # a listener that fails: one line in the status, nothing printed
    assert panel.state == "error" and "Error" in panel.status.value
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err


# ---- the bill before launch: scaletrain.plan's numbers for the panel's layout ----


def bill_panel(tmp_path, **kw):
    "A GPT-2-sized panel priced on 4 A100s (4 processes, micro-batch 8: a global batch of 32 x 1024 tokens)."
    args = dict(out_dir=tmp_path / "runs", model="gpt2", nproc=4, steps=300, micro_batch=8, gpu="a100-80gb")
    panel = LaunchPanel(**{**args, **kw})
    panel.precision.value = "bf16-mixed"
    panel.strategy.value = "zero2"
    panel.act_ckpt.value = "selective"
    return panel


def planned(cfg, gpus: int, gpu: str, steps: int):
    "What `scaletrain plan --config` gives for `cfg`'s own layout (the run's PUE, grid and price) on `gpus` GPUs."
    from scaletrain import plan

    r, t = cfg.run, cfg.train
    batch = t.micro_batch * t.grad_accum * gpus
    pl = plan.plan(
        cfg,
        gpus=gpus,
        gpu=gpu,
        global_batch=batch,
        precision=cfg.memory.precision,
        strategies=(cfg.parallel.strategy,),
        ac_policies=(cfg.memory.activation_checkpointing,),
        tokens=steps * batch * cfg.model.block_size,
        pue=r.pue,
        grid=r.grid_gco2_per_kwh / 1000,
        price=r.price_per_device_hour,
    )
    (lay,) = [l for l in pl.layouts if (l.dp, l.tp, l.pp, l.micro_batch) == (gpus, 1, 1, t.micro_batch)]
    return pl, lay


def test_the_panels_bill_is_the_planners(tmp_path):
    from scaletrain import plan

    panel = bill_panel(tmp_path, price=1.5)
    cfg = panel.config()
    assert cfg.run.price_per_device_hour == 1.5 and "run.price_per_device_hour=1.5" in panel.overrides()
    b = panel.bill_prediction
    pl, ref = planned(cfg, 4, "a100-80gb", 300)  # the planner's own enumeration finds the same layout
    assert (b["gpu"], b["gpus"], b["steps"], b["precision"]) == ("a100-80gb", 4, 300, "bf16-mixed")
    assert b["step_s"] == ref.step_time and b["mfu"] == ref.mfu and b["memory"] == ref.memory
    want = ref.bill
    assert (b["wall_s"], b["device_hours"], b["kwh"], b["co2_kg"], b["cost"]) == (
        want.days * 86400,
        want.gpu_hours,
        want.kwh,
        want.t_co2 * 1000,
        want.cost,
    )
    # by hand: the same layout through plan.evaluate and plan.bill, with the run's own PUE, grid and price
    hand = plan.Layout("zero2", 4, 1, 1, False, "1f1b", 0, "selective", 8, 1)
    plan.evaluate(pl.shape, hand, plan.get_gpu("a100-80gb"), 4, 32, "bf16-mixed", gpus_per_node=4)
    by_hand = plan.bill(hand.step_time, 4, 32 * 1024, 300 * 32 * 1024, 400.0, 1.0, 1.2, 0.48, 1.5)
    assert hand.step_time == b["step_s"] and by_hand == want
    assert by_hand.gpu_hours == pytest.approx(4 * 300 * hand.step_time / 3600)
    assert by_hand.kwh == pytest.approx(by_hand.gpu_hours * 0.4 * 1.2) and by_hand.cost == by_hand.gpu_hours * 1.5
    # the line shows those numbers, with units
    line = panel.bill.value
    assert f"{want.gpu_hours:.3g} GPU-hours" in line and "4 × 400 W × PUE 1.2" in line and "(480 g/kWh)" in line
    assert f"${want.cost:,.2f} at $1.5 per GPU-hour" in line or f"${want.cost:.2g} at $1.5" in line
    assert f"{ref.step_time * 1e3:.3g} ms" in line and "300 steps in " in line


def test_the_bill_follows_the_controls(tmp_path):
    panel = bill_panel(tmp_path, price=2.0)
    one = dict(panel.bill_prediction)
    panel.steps.value = 600  # twice the steps: twice the time, device-hours, energy, CO2 and money
    two = panel.bill_prediction
    assert two["step_s"] == one["step_s"] and two["steps"] == 600
    for k in ("wall_s", "device_hours", "kwh", "co2_kg", "cost"):
        assert two[k] == 2 * one[k], k
    panel.price.value = 4.0  # twice the price: twice the money, the same energy
    assert panel.bill_prediction["cost"] == 2 * two["cost"] and panel.bill_prediction["kwh"] == two["kwh"]
    assert panel.config().run.price_per_device_hour == 4.0
    panel.price.value = 0.0
    assert "not priced (run.price_per_device_hour=0)" in panel.bill.value
    panel.nproc.value = 8  # more GPUs, the same micro-batch: a larger global batch, and the planner's step time
    cfg = panel.config()
    _, ref = planned(cfg, 8, "a100-80gb", 600)
    eight = panel.bill_prediction
    assert eight["gpus"] == 8 and eight["step_s"] == ref.step_time and eight["device_hours"] == ref.bill.gpu_hours
    assert "8 × 400 W" in panel.bill.value
    panel.gpu_type.value = "h100-80gb"  # another GPU of the planner's table: its peak and power
    _, ref = planned(cfg, 8, "h100-80gb", 600)
    assert panel.bill_prediction["step_s"] == ref.step_time < eight["step_s"] and "8 × 700 W" in panel.bill.value
    base = ["run.pue=1.5", "run.grid_gco2_per_kwh=100"]  # the run's own PUE and grid intensity
    other = LaunchPanel(overrides=base, out_dir=tmp_path / "runs", model="gpt2", nproc=4, steps=300, micro_batch=8)
    other.gpu_type.value, other.precision.value = "a100-80gb", "bf16-mixed"
    other.strategy.value, other.act_ckpt.value = "zero2", "selective"
    o = other.bill_prediction
    assert o["kwh"] == pytest.approx(one["kwh"] * 1.5 / 1.2) and o["co2_kg"] == pytest.approx(o["kwh"] * 0.1)
    assert "PUE 1.5" in other.bill.value and "(100 g/kWh)" in other.bill.value


def test_the_bill_says_what_if_and_what_it_cannot_plan(tmp_path, monkeypatch):
    import scaletrain.widgets as widgets

    monkeypatch.setattr(widgets, "_smallest_gpu", lambda: None)  # a machine without GPUs, wherever the test runs
    panel = bill_panel(tmp_path)
    panel.precision.value = "fp32"  # planned at bf16-mixed, as scaletrain plan --config does, and said so
    fp32 = panel.bill_prediction
    assert fp32["precision"] == "bf16-mixed" and "priced at bf16-mixed" in panel.bill.value
    panel.precision.value = "bf16-mixed"
    assert panel.bill_prediction["step_s"] == fp32["step_s"]
    # this machine runs the test on CPU: a what-if bill, and how a CPU run's energy is recorded
    assert "what-if" in panel.bill.value and "no CPU step-time model" in panel.bill.value
    assert "run.cpu_watts_per_core" in panel.bill.value and "summary.json" in panel.bill.value
    # settings the planner does not model: one line, no numbers
    panel.act_ckpt.value = "every_k"
    assert panel.bill_prediction is None and "<br>" not in panel.bill.value
    assert "not planned: memory.activation_checkpointing=every_k" in panel.bill.value and " ms" not in panel.bill.value
    panel.act_ckpt.value = "none"
    panel.base.append("parallel.backend=fairscale")
    panel.update_plan()
    assert panel.bill_prediction is None and "not planned: parallel.backend=fairscale" in panel.bill.value
    panel.base[-1] = "parallel.tp=3"  # a config that does not validate: its error in the memory line, no bill
    panel.update_plan()
    assert panel.bill.value == "" and panel.bill_prediction is None and "parallel.tp=3" in panel.memory.value
    # on a GPU machine: its GPU mapped to the planner's table by name; another is a what-if
    assert widgets.plan_gpu_of("NVIDIA H100 80GB HBM3") == "h100-80gb" and widgets.plan_gpu_of("NVIDIA H200") == "h200"
    assert widgets.plan_gpu_of("NVIDIA H100 PCIe") is None and widgets.plan_gpu_of("NVIDIA GH200 480GB") is None
    assert widgets.plan_gpu_of("NVIDIA A100-SXM4-40GB") == "a100-40gb" and widgets.plan_gpu_of("NVIDIA A10G") is None
    monkeypatch.setattr(widgets, "_smallest_gpu", lambda: (143771.0, "NVIDIA H200"))
    here = LaunchPanel(out_dir=tmp_path / "runs", model="gpt2", nproc=8, micro_batch=8)
    assert here.gpu_type.value == "h200" and "h200 (this machine)" in [l for l, _ in here.gpu_type.options]
    assert "predicted bill on 8 × h200:" in here.bill.value and "what-if" not in here.bill.value
    here.gpu_type.value = "l40s"
    assert "what-if</b>: this machine has h200" in here.bill.value
    monkeypatch.setattr(widgets, "_smallest_gpu", lambda: (23028.0, "NVIDIA A10G"))
    other = LaunchPanel(out_dir=tmp_path / "runs", model="tiny")
    assert other.gpu_type.value == "h100-80gb" and "NVIDIA A10G is not in the planner" in other.bill.value


def test_a_context_parallel_bill_counts_each_sequence_once():
    # parallel.cp ranks share a sequence: the data-parallel degree is processes / (tp x pp x cp), as in the run,
    # and the bill is the planner's for that layout
    from scaletrain import plan
    from scaletrain.dist import ParallelDims

    cfg = load_config(
        overrides=[
            "model.family=llama",
            "model.n_layer=4",
            "model.n_embd=512",
            "model.n_head=8",
            "model.block_size=8192",
            "model.vocab_size=32000",
            "model.tie_weights=false",
            "parallel.strategy=fsdp",
            "parallel.cp=2",
            "train.micro_batch=4",
            "memory.precision=bf16-mixed",
            "train.steps=100",
        ]
    )
    from scaletrain.widgets import predict_bill

    b = predict_bill(cfg, 8, "h100-80gb")
    assert b["layout"].dp == ParallelDims.from_config(cfg, 8).dp == 4 and b["layout"].global_batch == 16
    pl = plan.plan(cfg, gpus=8, global_batch=16, strategies=("fsdp",), ac_policies=("none",))
    (ref,) = [l for l in pl.layouts if (l.dp, l.tp, l.cp, l.pp, l.micro_batch) == (4, 1, 2, 1, 4)]
    assert (b["step_s"], b["memory"], b["mfu"]) == (ref.step_time, ref.memory, ref.mfu)


def test_base_overrides_set_the_controls_and_bad_arguments_are_one_line(tmp_path):
    """A control's key among the base overrides is that control's first value (never silently replaced), the user's
    model shape keys win over the size preset, and an argument or override no control can hold is one line."""
    p = LaunchPanel(
        overrides=[
            "model.n_layer=6",
            "train.micro_batch=2",
            "parallel.strategy=fsdp",
            "train.steps=40",
            "memory.precision=bf16-mixed",
            f"run.out_dir={tmp_path / 'mine'}",
        ],
        out_dir=tmp_path / "runs",
        model="tiny",
    )
    c = p.config()
    assert (c.model.n_layer, c.train.micro_batch, c.parallel.strategy, c.train.steps, c.memory.precision) == (
        6,
        2,
        "fsdp",
        40,
        "bf16-mixed",
    )
    assert (p.micro_batch.value, p.strategy.value, p.steps.value, p.total_steps) == (2, "fsdp", 40, 40)
    assert p.out_dir == tmp_path / "mine" and c.run.out_dir == str(tmp_path / "mine")
    assert "337 k parameters" in p.memory.value  # the estimate is of the 6-layer model
    p.micro_batch.value = 4  # the control owns it from here
    assert p.config().train.micro_batch == 4
    cases = [
        (dict(strategy="nope"), "LaunchPanel: strategy='nope'; the panel offers ddp | zero1 | zero2 | fsdp | hsdp"),
        (dict(model="huge"), "LaunchPanel: model='huge'; the panel offers tiny | small | medium | gpt2 | gpt2-xl"),
        (
            dict(overrides=["train.micro_batch=auto"]),
            "LaunchPanel: train.micro_batch='auto'; the panel's control takes a whole number >= 1",
        ),
        (dict(overrides=["train.lr=abc"]), "LaunchPanel: train.lr='abc'; expected a number"),
    ]
    for kw, msg in cases:
        with pytest.raises(ConfigError) as e:
            LaunchPanel(out_dir=tmp_path / "runs", **kw)
        assert str(e.value) == msg
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("nproc", [3, 6, 64])
def test_a_what_if_world_gets_an_eval_batch_it_divides(tmp_path, nproc):
    # the panel has no eval-batch control: its default is rounded up to whole rows per rank, so any count is billed
    p = LaunchPanel(out_dir=tmp_path / "runs", model="tiny")
    p.nproc.value = nproc
    assert p.config().train.eval_batch % nproc == 0 and p.config().train.eval_batch >= 16
    assert "predicted memory per rank" in p.memory.value and "predicted bill on" in p.bill.value


def test_compare_with_no_runs_says_so_instead_of_an_empty_figure(tmp_path):
    p = LaunchPanel(out_dir=tmp_path / "none_here", model="tiny")
    p.compare_button.click()
    assert "no runs to compare in" in p.status.value and p.compare_plot.layout.display == "none"

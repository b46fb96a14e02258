"The launch panel, headless: set the controls, click the buttons, check what was launched and what the panel shows."

import json
from pathlib import Path
import pytest
from scaletrain.config import load_config
from scaletrain.launch import launch
from scaletrain.models.spec import get_spec
from scaletrain.procs import pid_alive
from scaletrain.registry import FAMILIES
from scaletrain.widgets import LaunchPanel
from conftest import notebook_function


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
    panel.resume_button.click()
    again = panel.run
    assert again is not run and again.resumed and "--resume" in again.cmd and panel.state == "running"
    assert again.wait(300) == "finished", again.error
    assert panel.state == "finished" and "step 60/60" in panel.status.value
    assert panel.plot_points == 60 and panel.plot.value[:4] == b"\x89PNG" and "60 points" in panel.plot_caption.value
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
    for fam in FAMILIES.names():
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

"""A full disk is one line: on a small tmpfs, a checkpoint (1 and 2 processes), a log append and the token cache that
find no room end the run with one `scaletrain: error: disk full: ...` line naming the path and the space left, exit
code 2, no traceback, no rank left waiting; earlier checkpoints and `latest` stay, nothing half-written looks valid,
and once there is room `--resume` finishes the run with the losses of an uninterrupted one.

Mounting a tmpfs needs root (CAP_SYS_ADMIN); elsewhere these tests are skipped with that reason."""

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
import pytest
from conftest import run_cli, tiny
from scaletrain.checkpoint import latest_checkpoint, verify_checkpoint
from scaletrain.config import load_config
from scaletrain.errors import DiskFull
from scaletrain.metrics import read_metrics
from scaletrain.train import Callback, Trainer

ELASTIC_LOG = re.compile(r"^[EWI]\d{4} \d\d:\d\d:\d\d")  # torchrun's own log lines (its agent), not scaletrain's


class SmallDisk:
    "A tmpfs of `size` bytes at `path`; `resize` grows or shrinks it in place (files stay)."

    def __init__(self, path: Path, size: int):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs CAP_SYS_ADMIN")

    def resize(self, size: int):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def close(self):
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN) and mount(8)")
    disks = []

    def make(size: int) -> SmallDisk:
        d = SmallDisk(tmp_path / f"disk-{uuid.uuid4().hex[:6]}", size)
        disks.append(d)
        return d

    yield make
    for d in disks:
        d.close()


def messages(stderr: str) -> list:
    "What the run said on stderr, less the progress bars (tqdm redraws it with \\r) and torchrun's agent log."
    return [
        l
        for l in stderr.splitlines()
        if l.strip() and not l.lstrip().startswith(("train:", "tokenizing ")) and not ELASTIC_LOG.match(l)
    ]


def losses(run_dir) -> dict:
    recs = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"steps logged more than once or out of order: {steps}"
    return {r["step"]: r["loss"] for r in recs}


@pytest.fixture(scope="module")
def references(tmp_path_factory, corpus, cache_dir):
    "The same runs on a disk with room: their losses, and the size of one checkpoint."
    out = tmp_path_factory.mktemp("df_ref")
    refs = {}
    for n in (1, 2):
        r = run_cli("train", "--nproc", n, *tiny(corpus, cache_dir, out, f"run.name=ref{n}"))
        assert r.returncode == 0, r.stderr[-3000:]
        refs[n] = out / f"ref{n}"
    ck = refs[1] / "checkpoints" / "step_00000003"
    size = sum(p.stat().st_size for p in ck.rglob("*") if p.is_file())
    return refs, size


@pytest.mark.parametrize("nproc", [1, 2])
def test_full_disk_at_a_checkpoint_is_one_line_and_resume_finishes(small_disk, references, corpus, cache_dir, nproc):
    refs, ck_size = references
    disk = small_disk(int(ck_size * 1.5) // 4096 * 4096)  # the first checkpoint (step 3) fits, the second does not
    run = disk.path / "full"
    r = run_cli("train", "--nproc", nproc, *tiny(corpus, cache_dir, disk.path, "run.name=full"))
    said = messages(r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    assert len(said) == 1, said
    assert said[0].startswith(f"scaletrain: error: disk full: cannot write {run}/checkpoints/step_00000006 (")
    assert said[0].endswith(
        f"free there); earlier checkpoints are intact (latest: step_00000003); free space, then: "
        f"scaletrain train --resume {run}"
    )
    # exit code 2 however many processes: through torchrun, the launcher passes the ranks' code on
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:])
    # nothing half-written left looking like a checkpoint; `latest` and the earlier one untouched, and they verify
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000003"]
    assert latest_checkpoint(run).name == "step_00000003" and verify_checkpoint(latest_checkpoint(run))
    disk.resize(ck_size * 6)  # room again
    r = run_cli("train", "--nproc", nproc, "--resume", run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert latest_checkpoint(run).name == "step_00000006"
    assert losses(run) == losses(refs[nproc])  # an exact resume: every step logged once, as uninterrupted


class FillDiskAfterSave(Callback):
    """After the first checkpoint, fill the disk: metrics.jsonl is padded to a whole page (tmpfs gives a file room a
    page at a time) and another file takes every free byte, so the next log append finds no room."""

    def after_save(self):
        if self.trainer.step != 3:
            return
        log = self.trainer.run_dir / "metrics.jsonl"
        with open(log, "a") as f:
            f.write("\n" * (-log.stat().st_size % 4096))  # blank lines: a reader skips them
        fd = os.open(self.trainer.run_dir.parent / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)


def test_full_disk_at_a_log_append_is_a_disk_full_and_the_run_continues(small_disk, corpus, cache_dir):
    disk = small_disk(8 * 2**20)
    cfg = load_config(overrides=tiny(corpus, cache_dir, disk.path, "run.name=log", "run.log_every=1"))
    run = disk.path / "log"
    t = Trainer(cfg, run_dir=run, callbacks=[FillDiskAfterSave()])
    with pytest.raises(DiskFull) as e:
        t.fit()
    msg = str(e.value)
    assert msg.startswith(f"disk full: cannot write {run / 'metrics.jsonl'} (") and "\n" not in msg
    assert msg.endswith(f"latest: step_00000003); free space, then: scaletrain train --resume {run}")
    assert latest_checkpoint(run).name == "step_00000003" and verify_checkpoint(latest_checkpoint(run))
    assert max(losses(run)) <= 4  # the run stopped at the first step it could not log
    (disk.path / "filler").unlink()
    summary = Trainer(load_config(run / "config.yaml"), run_dir=run, resume=True).fit()
    assert summary["status"] == "finished" and sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_full_disk_while_building_the_token_cache(small_disk, corpus, tmp_path):
    disk = small_disk(8192)  # the lock file fits, the tokens do not
    out = tmp_path / "runs"
    args = tiny(corpus, disk.path, out, "run.name=c")
    r = run_cli("train", *args)
    said = messages(r.stderr)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(said) == 1, r.stderr[-3000:]
    assert said[0].startswith(f"scaletrain: error: disk full: cannot write {disk.path}/tokens")
    assert "nothing half-written was kept" in said[0]
    # no half-written cache a later run could trust: only the lock is left, and no run folder was made
    assert [p.name for p in (disk.path / "tokens").iterdir() if not p.name.endswith(".lock")] == []
    assert not (out / "c").exists()
    disk.resize(2**20)
    r = run_cli("train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((disk.path / "tokens").glob("*/meta.json"))) == 1

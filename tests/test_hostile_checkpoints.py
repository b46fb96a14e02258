"Hostile and damaged checkpoint folders, pointers and non-finite steps: refused in one line, nothing runs or is lost."

import os
import pickle
import shutil
from pathlib import Path
import pytest
import torch
from conftest import run_cli, tiny
from scaletrain import checkpoint as ckpt
from scaletrain.config import load_config
from scaletrain.errors import CheckpointError
from scaletrain.train import Callback, Trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, cache_dir):
    "A 2-layer run (checkpoints at steps 3 and 6) and a 3-layer one, each trained once."
    out = tmp_path_factory.mktemp("runs")
    for name, extra in (("two", []), ("three", ["model.n_layer=3"])):
        r = run_cli("train", *tiny(corpus, cache_dir, out, f"run.name={name}", *extra))
        assert r.returncode == 0, r.stderr[-2000:]
    return out


def snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def copy_run(runs, tmp_path, name="two") -> Path:
    return Path(shutil.copytree(runs / name, tmp_path / name))


def one_line_exit_2(r, *words):
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("train:")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("scaletrain: error:"), r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


class Plant:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["export", "resume"])
def test_planted_metadata_runs_nothing(runs, tmp_path, command):
    run = copy_run(runs, tmp_path)
    marker = tmp_path / "pwned"
    ck = run / "checkpoints" / "step_00000006"
    (ck / ".metadata").write_bytes(pickle.dumps(Plant(marker)))
    ckpt.write_manifest(ck)  # a planted file with a matching manifest: the unpickler, not the manifest, stops it
    before = snapshot(run)
    if command == "export":
        r = run_cli("export", run, tmp_path / "out.safetensors")
        assert not (tmp_path / "out.safetensors").exists()
    else:
        r = run_cli("train", "--resume", run, "train.steps=9")
    one_line_exit_2(r, ".metadata is not DCP metadata", "posix.system")
    assert not marker.exists() and snapshot(run) == before


def test_changed_missing_or_extra_file_is_refused(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    ck = run / "checkpoints" / "step_00000006"
    shard = next(ck.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run_cli("export", run, tmp_path / "out.safetensors")
    one_line_exit_2(r, shard.name, "has changed")
    shard.unlink()
    one_line_exit_2(run_cli("export", run, tmp_path / "o.safetensors"), shard.name, "is missing")
    (ck / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="extra.pt is not one of its files|is missing"):
        ckpt.verify_checkpoint(ck)
    (ck / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        ckpt.read_trainer_state(ck)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    "content", [b"../../three/checkpoints/step_00000006", b"/etc", b"\xff\xfe", b"step_00000099", b"best_00000006"]
)
def test_latest_must_name_a_checkpoint_of_the_run(runs, tmp_path, content):
    run = copy_run(runs, tmp_path)
    (run / "checkpoints" / "latest").write_bytes(content)
    before = snapshot(run)
    one_line_exit_2(run_cli("export", run, tmp_path / "out.safetensors"), "checkpoints/latest")
    one_line_exit_2(run_cli("train", "--resume", run, "train.steps=9"), "checkpoints/latest")
    assert snapshot(run) == before and not (tmp_path / "out.safetensors").exists()


def test_foreign_checkpoint_is_refused_before_anything_is_deleted(runs, tmp_path):
    "A 3-layer checkpoint whose trainer state claims the 2-layer config: its tensors give it away."
    run = copy_run(runs, tmp_path)
    ck = run / "checkpoints"
    foreign = Path(shutil.copytree(runs / "three" / "checkpoints" / "step_00000006", ck / "step_00000009"))
    st = torch.load(foreign / "trainer_state.pt", weights_only=True)
    st["config"] = torch.load(ck / "step_00000006" / "trainer_state.pt", weights_only=True)["config"]
    st["step"] = 9
    torch.save(st, foreign / "trainer_state.pt")
    ckpt.write_manifest(foreign)
    (ck / "latest").write_text("step_00000009")
    before = snapshot(run)
    one_line_exit_2(run_cli("train", "--resume", run, "train.steps=12"), "blocks.2.", "another model")
    assert snapshot(run) == before


def test_retention_by_step_number_keeps_the_written_one(tmp_path):
    ck = tmp_path / "checkpoints"
    for n in (3, 6, 99999999, 100000000):
        (ck / f"step_{n:08d}").mkdir(parents=True)
    ckpt.prune(ck, ck / "step_99999999", keep=2)
    assert sorted(d.name for d in ck.iterdir()) == ["step_00000006", "step_99999999"]


def _fake_step(ck, n):
    "A folder `is_complete` accepts, pointed at by `latest`: what a save leaves, without the weights."
    d = ck / f"step_{n:08d}"
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"")
    (d / "trainer_state.pt").write_bytes(b"")
    (ck / "latest").write_text(d.name)
    return d


def test_a_checkpoint_being_read_is_not_pruned_under_the_reader(tmp_path):
    "An export of a job still training: its saves prune old checkpoints, but not the one being read, until it is done."
    run = tmp_path / "run"
    ck = run / "checkpoints"
    first = _fake_step(ck, 3)

    def read(found):
        assert found == first
        for n in (6, 9):  # the job saves twice (train.keep_checkpoints=1) while the export reads step 3
            ckpt.prune(ck, _fake_step(ck, n), keep=1)
        assert first.is_dir() and (first / ".metadata").is_file()  # still whole
        assert not (ck / "step_00000006").exists()  # pruning went on around it
        return found.name

    assert ckpt.reading(run, read) == "step_00000003"
    assert not (ck / ckpt.READERS).exists()  # the pin is gone with the reader, and its folder
    ckpt.prune(ck, _fake_step(ck, 12), keep=1)  # the next save prunes it
    assert sorted(d.name for d in ck.iterdir()) == ["latest", "step_00000012"]
    # a reader that died without removing its pin does not keep a checkpoint forever
    (ck / ckpt.READERS).mkdir()
    (ck / ckpt.READERS / "step_00000012.999999999").write_text('{"pid": 999999999, "start": null}')
    ckpt.prune(ck, _fake_step(ck, 15), keep=1)
    assert not (ck / "step_00000012").exists() and list((ck / ckpt.READERS).iterdir()) == []


def test_a_checkpoint_held_twice_in_one_process_stays_until_both_let_go(tmp_path):
    """`held` pins once per hold (a sweep holds one pretraining run's checkpoint for each of its runs): the inner
    hold ending leaves the outer's pin, and a hold whose body raises still lets go."""
    import socket

    run = tmp_path / "run"
    ck = run / "checkpoints"
    first = _fake_step(ck, 3)
    with ckpt.held(run) as outer:
        with ckpt.held(run) as inner:
            pins = sorted(p.name for p in (ck / ckpt.READERS).iterdir())
            assert outer == inner == first and len(pins) == 2
            assert all(p.startswith(f"step_00000003.{socket.gethostname()}.") for p in pins), pins
        ckpt.prune(ck, _fake_step(ck, 6), keep=1)
        assert first.is_dir() and len(list((ck / ckpt.READERS).iterdir())) == 1
    with pytest.raises(RuntimeError):
        with ckpt.held(ck / "step_00000006"):
            raise RuntimeError("the reader failed")
    assert not (ck / ckpt.READERS).exists()
    ckpt.prune(ck, _fake_step(ck, 9), keep=1)
    assert sorted(d.name for d in ck.iterdir()) == ["latest", "step_00000009"]


def test_a_reader_that_meets_a_pruned_latest_reads_the_new_one(tmp_path, monkeypatch):
    "`latest` read just before the job moved it on and pruned what it named: the reader tries again."
    run = tmp_path / "run"
    ck = run / "checkpoints"
    _fake_step(ck, 3)
    real, calls = ckpt.resolve_checkpoint, []

    def racing(path):
        calls.append(path)
        if len(calls) == 1:  # the job saves step 6 and prunes step 3 between our reading `latest` and step 3
            ckpt.prune(ck, _fake_step(ck, 6), keep=1)
            raise CheckpointError("checkpoint pointer latest: names step_00000003, which is missing")
        return real(path)

    monkeypatch.setattr(ckpt, "resolve_checkpoint", racing)
    assert ckpt.reading(run, lambda found: found.name) == "step_00000006" and len(calls) == 2
    monkeypatch.setattr(ckpt, "resolve_checkpoint", real)
    (ck / "latest").write_text("step_00000099")  # a pointer that stays wrong is still refused, in its own words
    with pytest.raises(CheckpointError, match="names step_00000099"):
        ckpt.reading(run, lambda found: found.name)


class NaNAt(Callback):
    "Make the model's output NaN at the given steps (1-based)."

    def __init__(self, *steps):
        self.steps, self.hook = set(steps), None

    def before_step(self):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        if self.trainer.step + 1 in self.steps:
            self.hook = self.trainer.engine.module.register_forward_hook(lambda m, i, o: o * float("nan"))


def finite(run_dir) -> bool:
    from scaletrain.models.spec import build_model

    c = ckpt.latest_checkpoint(run_dir)
    m = build_model(ckpt.checkpoint_config(c).model)
    ckpt.load_model_weights(c, m)
    return all(bool(torch.isfinite(p).all()) for p in m.parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_step_is_skipped_and_logged(corpus, cache_dir, tmp_path, monkeypatch, fused):
    "With the fused AdamW (the default), which skips the update on the device without a host read, and without."
    from scaletrain import engine
    from scaletrain.metrics import read_metrics

    kw = engine.adamw_kwargs
    monkeypatch.setattr(engine, "adamw_kwargs", lambda *a: dict(kw(*a), fused=fused))
    t = Trainer(load_config(overrides=tiny(corpus, cache_dir, tmp_path, "run.name=skip")), callbacks=[NaNAt(2)])
    assert getattr(t.engine.optimizer, "_step_supports_amp_scaling", False) == fused
    s = t.fit()
    assert s["status"] == "finished" and s["nonfinite_steps"] == 1
    recs = {r["step"]: r for r in read_metrics(t.run_dir / "metrics.jsonl") if "loss" in r}
    assert recs[2]["nonfinite"] and recs[2]["skipped"] and not recs[3].get("nonfinite")
    assert finite(t.run_dir)


def test_nonfinite_stop_leaves_a_checkpoint_that_continues(corpus, cache_dir, tmp_path, capsys):
    ov = tiny(corpus, cache_dir, tmp_path, "run.name=stop", "train.nonfinite=stop")
    t = Trainer(load_config(overrides=ov), callbacks=[NaNAt(5)])
    s = t.fit()
    assert s["status"] == "anomaly" and s["steps"] == 4
    assert "Last good checkpoint: " + str(t.run_dir / "checkpoints" / "step_00000003") in capsys.readouterr().err
    assert finite(t.run_dir)
    s2 = Trainer(load_config(t.run_dir / "config.yaml"), run_dir=t.run_dir, resume=True).fit()
    assert s2["status"] == "finished" and s2["steps"] == 6 and finite(t.run_dir)


def test_skips_in_a_row_stop_the_run(corpus, cache_dir, tmp_path):
    ov = tiny(corpus, cache_dir, tmp_path, "run.name=limit", "train.nonfinite_limit=2")
    s = Trainer(load_config(overrides=ov), callbacks=[NaNAt(4, 5)]).fit()
    assert s["status"] == "anomaly" and "2 non-finite steps in a row" in s["anomaly"] and s["nonfinite_steps"] == 1


def test_nonfinite_weights_are_never_written(tmp_path):
    w = torch.ones(3)
    w[1] = float("nan")
    with pytest.raises(CheckpointError, match="model.*w holds NaN"):
        ckpt.write_checkpoint(tmp_path, "step_00000001", {"model": {"w": w}}, {"step": 1})
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_fsdp_two_processes_skip_a_nonfinite_step_and_stop_with_finite_checkpoints(corpus, cache_dir, tmp_path):
    "Under FSDP on 2 processes the grad norm is a global reduction: both ranks skip the same step, or stop together."
    from test_parallel import launch, results

    fs = ["parallel.strategy=fsdp", "train.ckpt_every=2"]
    cases = [
        dict(name="skip", overrides=fs, nan_at=[2]),
        dict(name="stop", overrides=fs + ["train.nonfinite=stop"], nan_at=[3]),
    ]
    out = launch(2, cases, corpus, cache_dir, tmp_path / "dist")
    skip, stop = results(out, "skip", 2), results(out, "stop", 2)
    assert all(r["summary"]["status"] == "finished" and r["summary"]["nonfinite_steps"] == 1 for r in skip)
    assert all(r["summary"]["status"] == "anomaly" and r["summary"]["steps"] == 2 for r in stop)
    for r in skip + stop:
        assert all(bool(torch.isfinite(w).all()) for w in r["weights"].values())
    for name in ("skip", "stop"):
        assert finite(Path((out / name / "run_dir.txt").read_text()))

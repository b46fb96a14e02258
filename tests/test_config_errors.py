"Bad input: one line naming the field, the value and what is allowed; exit code 2; nothing overwritten."

import pytest
import torch
from conftest import run_cli, tiny


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("scaletrain: error: ")
    return err


@pytest.mark.parametrize(
    "override, expect",
    [
        ("train.step=5", "unknown key 'train.step' (did you mean 'train.steps'?)"),
        ("modle.n_layer=2", "unknown key 'modle.n_layer' (did you mean 'model.n_layer'?)"),
        ("train.steps=lots", "train.steps='lots': expected a whole number"),
        ("train.lr=fast", "train.lr='fast': expected a number"),
        ("model.bias=maybe", "model.bias='maybe': expected true or false"),
        ("train.steps=0", "train.steps=0: must be >= 1"),
        ("model.dropout=1.5", "model.dropout=1.5: must be <= 0.99"),
        ("memory.precision=fp8", "memory.precision='fp8': allowed: fp32 | bf16-mixed | fp16-mixed | bf16-true"),
        ("model.n_head=3", "model.n_embd=256 is not divisible by model.n_head=3"),
        ("memory.cpu_offload=true", "memory.cpu_offload=true needs parallel.strategy=fsdp"),
        ("train.warmup_steps=900", "train.warmup_steps=900 exceeds train.steps=250; set train.warmup_steps<=250"),
        ("nonsense", "override 'nonsense': expected key=value"),
    ],
)
def test_bad_overrides(tmp_path, override, expect):
    err = one_line_error(run_cli("train", f"run.out_dir={tmp_path}", override))
    assert expect in err
    assert not any(tmp_path.iterdir()), "no run folder may be created for bad input"


def test_bad_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  stpes: 3\n")
    assert "unknown key 'train.stpes' (did you mean 'train.steps'?)" in one_line_error(run_cli("train", "--config", f))
    f.write_text("train: [1, 2\n")
    assert "not valid YAML" in one_line_error(run_cli("train", "--config", f))
    assert "cannot read" in one_line_error(run_cli("train", "--config", tmp_path / "missing.yaml"))


def test_unreadable_data(tmp_path):
    err = one_line_error(run_cli("train", f"run.out_dir={tmp_path}/runs", f"data.source={tmp_path}/nope"))
    assert f"data.source='{tmp_path}/nope': no such folder" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "contains no text files" in one_line_error(
        run_cli("train", f"run.out_dir={tmp_path}/runs", f"data.source={empty}")
    )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_missing_and_corrupt_checkpoint(tmp_path, corpus, cache_dir):
    assert "not a run folder" in one_line_error(run_cli("train", "--resume", tmp_path / "none"))
    ov = tiny(corpus, cache_dir, tmp_path / "runs", "run.name=r", "train.steps=3", "train.ckpt_every=0")
    r = run_cli("train", *ov)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "r"
    ck = run / "checkpoints" / "step_00000003"
    # corrupt every shard of the checkpoint
    for f in ck.glob("*.distcp"):
        f.write_bytes(b"garbage")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    err = one_line_error(run_cli("train", "--resume", run, "train.steps=5"))
    assert str(ck) in err and "__0_0.distcp has changed" in err  # the manifest catches it before DCP reads it
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # config.yaml included
    good = (run / "config.yaml").read_bytes()
    (run / "config.yaml").write_text("train: [1, 2\n")  # the error names what the user typed: --resume, not --config
    err = one_line_error(run_cli("train", "--resume", run))
    assert err.startswith(f"scaletrain: error: --resume {run}: {run / 'config.yaml'}: not valid YAML"), err
    (run / "config.yaml").write_bytes(good)
    (ck / ".metadata").unlink()
    err = one_line_error(run_cli("train", "--resume", run))
    assert "checkpoints/latest: names step_00000003, which is missing, a link or incomplete" in err


def test_existing_run_folder_is_never_reused(tmp_path, corpus, cache_dir):
    ov = tiny(corpus, cache_dir, tmp_path, "run.name=keep", "train.steps=2", "train.ckpt_every=0")
    assert run_cli("train", *ov).returncode == 0
    snapshot = {p: p.read_bytes() for p in (tmp_path / "keep").rglob("*") if p.is_file()}
    err = one_line_error(run_cli("train", *ov))
    assert "run.name=keep" in err and "already exists" in err and "--resume" in err
    assert {p: p.read_bytes() for p in (tmp_path / "keep").rglob("*") if p.is_file()} == snapshot


def test_resume_with_config_file_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("{}\n")
    assert "--config with --resume" in one_line_error(
        run_cli("train", "--resume", tmp_path, "--config", tmp_path / "config.yaml")
    )


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--nproc", "3", "parallel.tp=2"], "world size 3 is not divisible by parallel.tp x parallel.pp = 2 x 1"),
        (
            ["--nproc", "2", "parallel.pp=2", "model.tie_weights=false", "model.n_layer=1"],
            "needs 2 pipeline stages, more than model.n_layer=1",
        ),
        (["--nproc", "2", "parallel.tp=3"], "model.n_head=4 is not divisible by parallel.tp=3"),
        (["--nproc", "2", "parallel.strategy=zero3"], "allowed: ddp | zero1 | zero2 | fsdp"),
        (["--nproc", "2", "parallel.pp=2", "parallel.pp_schedule=zb"], "allowed: gpipe | 1f1b | interleaved1f1b"),
        (["--nproc", "2", "parallel.strategy=fsdp", "parallel.backend=fairscale"], "fairscale implements only zero1"),
        (
            ["--nproc", "2", "parallel.pp=2", "model.tie_weights=false", "parallel.microbatches=1"],
            "fewer than parallel.pp=2 stages",
        ),
        (["--nproc", "2", "parallel.pp=2"], "model.tie_weights=true with parallel.pp=2"),
    ],
)
def test_bad_parallel_layouts_refused_before_any_process_starts(tmp_path, args, expect):
    r = run_cli("train", *args, f"run.out_dir={tmp_path}")
    assert expect in one_line_error(r)
    assert "launching" not in r.stdout and not any(tmp_path.iterdir())


def test_cpu_offload_without_a_gpu_is_one_line(tmp_path):
    "FSDP's CPU offload moves state off a GPU (pinned memory): on a CPU run it is refused before anything is written."
    for device in ("cpu",) + (() if torch.cuda.is_available() else ("auto",)):
        err = one_line_error(
            run_cli(
                "train",
                f"run.out_dir={tmp_path}",
                "parallel.strategy=fsdp",
                "memory.cpu_offload=true",
                f"train.device={device}",
            )
        )
        assert f"memory.cpu_offload=true with train.device={device}" in err, err
    assert not any(tmp_path.iterdir())


def test_multinode_without_rendezvous_is_one_line_and_writes_nothing(tmp_path):
    err = one_line_error(run_cli("train", "--nnodes", "2", f"run.out_dir={tmp_path}", "run.name=mn"))
    assert "rdzv_endpoint" in err and not any(tmp_path.iterdir())

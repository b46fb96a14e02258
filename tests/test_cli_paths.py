"""Output paths and numbers the CLI refuses in one line (exit code 2) before anything is written or removed: an export
into (or over) the run it reads, a path through a file, negative or non-finite numbers, a --row past the table. Also:
key=value overrides may come before or after options, and an export gets the permissions the umask gives."""

import os
import stat
from pathlib import Path
import subprocess
import sys
import pytest
from conftest import run_cli, tiny


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("scaletrain: error: ") and "Traceback" not in err, err
    return err


def snapshot(d):
    "Every file under `d` (links not followed), with its bytes: what a refused command must leave as it was."
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus, cache_dir):
    "One tiny finished run (2 steps, a checkpoint), shared by every test here; none of them may change it."
    out = tmp_path_factory.mktemp("runs")
    args = tiny(corpus, cache_dir, out, "run.name=r", "train.steps=2", "train.eval_every=2", "train.ckpt_every=2")
    r = run_cli("train", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "r"


@pytest.fixture
def unchanged(run):
    "Assert, after the test, that the run folder and its parent hold exactly what they held before."
    before, parent = snapshot(run), sorted(p.name for p in run.parent.iterdir())
    yield
    assert snapshot(run) == before
    assert sorted(p.name for p in run.parent.iterdir()) == parent


@pytest.mark.parametrize(
    "out, extra, expect",
    [
        (lambda r: r, ["--force"], "is "),  # the run folder itself: --force used to delete it
        (lambda r: r.parent, ["--force"], "contains "),  # a folder holding it
        (lambda r: r / "hf", ["--force"], "lies inside "),
        (lambda r: r / ".." / r.name, ["--force"], "is "),  # the same folder, spelled differently
        (lambda r: r / "model.safetensors", [], "lies inside "),
        (lambda r: r.parent / "link", ["--force"], "is "),  # a symlink to the run
    ],
)
def test_export_never_writes_over_or_into_its_run(run, unchanged, out, extra, expect):
    o = out(run)
    if o.name == "link":
        o.symlink_to(run, target_is_directory=True)
    try:
        err = one_line_error(run_cli("export", run, o, *extra, "--no-check"))
    finally:
        if o.name == "link":
            o.unlink()
    assert f"export: OUT={o}: {expect}" in err and "which is being read" in err and "nothing was written" in err


def test_export_of_a_checkpoint_folder_protects_its_run(run, unchanged):
    step = sorted((run / "checkpoints").glob("step_*"))[-1]
    err = one_line_error(run_cli("export", step, run, "--force", "--no-check"))
    assert f"export: OUT={run}: is {run}, which is being read" in err


@pytest.mark.parametrize(
    "cmd",
    [
        lambda run, f: ["export", run, f / "sub", "--no-check"],
        lambda run, f: ["export", run, f / "sub.safetensors"],
        lambda run, f: ["plan", "--params", "1e8", "--gpus", "1", "--write-config", f / "sub" / "c.yaml"],
        lambda run, f: ["compress", run, "--out", f / "sub"],
    ],
)
def test_an_output_path_through_a_file_is_one_line(run, unchanged, tmp_path, cmd):
    f = tmp_path / "a_file"
    f.write_text("keep\n")
    args = cmd(run, f)
    err = one_line_error(run_cli(*args))
    flag = {"export": "export: OUT", "plan": "plan: --write-config", "compress": "compress: --out"}[args[0]]
    assert f"{flag}={args[-1] if args[0] != 'export' else args[2]}: {f} is a file, so nothing can be made" in err
    assert f.read_text() == "keep\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_an_output_of_the_other_kind_is_one_line(run, unchanged, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("keep\n")
    assert f"export: OUT={f}: is a file, not a folder" in one_line_error(
        run_cli("export", run, f, "--force", "--no-check")
    )
    assert f"compress: --out={f}: is a file, not a folder" in one_line_error(run_cli("compress", run, "--out", f))
    err = one_line_error(run_cli("plan", "--params", "1e8", "--gpus", "1", "--write-config", tmp_path, "--force"))
    assert f"plan: --write-config={tmp_path}: is a folder, not a file" in err
    assert f.read_text() == "keep\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--recover-steps", "-5"], "compress: --recover-steps=-5: must be a whole number >= 0"),
        (["--recover-lr", "-1"], "compress: --recover-lr=-1.0: must be a finite number > 0"),
        (["--recover-lr", "nan"], "compress: --recover-lr=nan: must be a finite number > 0"),
        (["--batch", "0"], "compress: --batch=0: must be a whole number >= 1"),
        (["--repeats", "-1"], "compress: --repeats=-1: must be a whole number >= 1"),
        (["--threads", "-2"], "compress: --threads=-2: must be a whole number >= 0"),
        (["--prune", "none", "--sparsity", "0.7"], "compress: --sparsity 0.7 with --prune none prunes nothing"),
        (["--quant", "int8-weight,int8-weight"], "compress: quant int8-weight given twice; name each mode once"),
    ],
)
def test_compress_refuses_negative_numbers(run, unchanged, tmp_path, args, expect):
    assert expect in one_line_error(run_cli("compress", run, "--out", tmp_path / "c", *args))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--params", "inf"], "plan: --params=inf: must be a finite number > 0"),
        (["--params", "7e9", "--nodes", "0"], "plan: --nodes=0: must be a whole number >= 1"),
        (["--params", "7e9", "--gpu-mem", "inf"], "plan: --gpu-mem=inf: must be a finite number > 0"),
        (["--params", "7e9", "--intra-bw", "inf"], "plan: --intra-bw=inf: must be a finite number > 0"),
        (["--params", "7e9", "--inter-lat", "-1"], "plan: --inter-lat=-1.0: must be a finite number > 0"),
        (["--params", "7e9", "--peak-tflops", "inf"], "plan: --peak-tflops=inf: must be a finite number > 0"),
        (["--params", "7e9", "--power-util", "5"], "plan: --power-util=5.0: must be in (0, 1]"),
        (["--params", "7e9", "--power-util", "0"], "plan: --power-util=0.0: must be in (0, 1]"),
        (["--params", "7e9", "--pue", "nan"], "plan: --pue=nan: must be in [1, 5]"),
        (["--params", "7e9", "--pue", "0.9"], "plan: --pue=0.9: must be in [1, 5]"),
        (["--params", "7e9", "--tokens", "inf"], "plan: --tokens=inf: must be a number > 0 (at most 1e18)"),
        (["--params", "7e9", "--tokens", "0"], "plan: --tokens=0.0: must be a number > 0"),
        (["--params", "7e9", "--grid", "-1"], "plan: --grid=-1.0: must be in [0, 2] kg CO2 per kWh"),
        (["--params", "7e9", "--price", "inf"], "plan: --price=inf: must be a finite number >= 0"),
        (
            ["--params", "7e9", "--gpu", "a100", "--precision", "fp8-mixed"],
            "plan: --precision=fp8-mixed: a100-80gb has no float8 tensor cores; plan it on h100-80gb | h200 | l40s",
        ),
    ],
)
def test_plan_refuses_bad_numbers(tmp_path, args, expect):
    r = run_cli("plan", *args, "--write-config", tmp_path / "c.yaml")
    assert expect in one_line_error(r) and r.stdout == "" and not any(tmp_path.iterdir())


def test_plan_row_past_the_table_prints_nothing(tmp_path):
    r = run_cli("plan", "--params", "1e8", "--gpus", "1", "--write-config", tmp_path / "c.yaml", "--row", "999")
    err = one_line_error(r)
    assert "plan: --row=999: the plan lists" in err and "give a row from 1 to" in err
    assert r.stdout == "" and not any(tmp_path.iterdir())


def test_overrides_may_follow_options(run, tmp_path, corpus, cache_dir):
    "key=value overrides before, between and after options all count (argparse's intermixed parsing)."
    r = run_cli("plan", "--config", run / "config.yaml", "--gpus", "1", "model.n_layer=3", "--top", "1")
    assert r.returncode == 0 and "layers 3" in r.stdout, r.stderr[-2000:]
    a, b = tiny(corpus, cache_dir, tmp_path)[:8], tiny(corpus, cache_dir, tmp_path)[8:]
    r = run_cli("train", *a, "--nproc", "1", *b, "--max-restarts", "0", "run.name=mixed", "train.steps=3")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = (tmp_path / "mixed" / "config.yaml").read_text()
    assert "steps: 3\n" in cfg and "n_layer: 2\n" in cfg
    err = one_line_error(run_cli("train", "--nproc", "1", "model.n_layer=0"))
    assert "model.n_layer=0: must be >= 1" in err
    err = one_line_error(run_cli("data", "prepare", "stdlib", "--quiet", "prep.no_such_key=1"))
    assert "prep.no_such_key" in err
    assert "data prepare: unrecognized arguments: --bogus" in one_line_error(
        run_cli("data", "prepare", "stdlib", "--quiet", "--bogus")
    )


def test_launch_keeps_a_scripts_arguments():
    "launch is not intermixed: everything after its target belongs to the target."
    from scaletrain.cli import launch_parser

    a = launch_parser().parse_args(["--nproc", "2", "script.py", "--lr", "3", "x=1", "--nproc", "5"])
    assert a.target == "script.py" and a.args == ["--lr", "3", "x=1", "--nproc", "5"] and a.nproc == 2


@pytest.mark.parametrize("umask, dmode, fmode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_export_gets_the_permissions_of_the_umask(run, unchanged, tmp_path, umask, dmode, fmode):
    out = tmp_path / "hf"
    r = subprocess.run(
        [sys.executable, "-m", "scaletrain.cli", "export", str(run), str(out), "--no-check"],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        preexec_fn=lambda: os.umask(umask),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert stat.S_IMODE(out.stat().st_mode) == dmode
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in files and files == {n: fmode for n in files}, files


def test_plan_flags_that_would_do_nothing_are_refused(tmp_path):
    for args, expect in (
        (["--force"], "plan: --force: replaces a --write-config FILE; give --write-config FILE with it"),
        (["--write-config", ""], "plan: --write-config='': empty; give a file path"),
        (["--row", "1"], "plan: --row=1: must be >= 1, with --write-config FILE"),
    ):
        r = run_cli("plan", "--params", "1e8", "--gpus", "1", *args, cwd=tmp_path)
        assert expect in one_line_error(r) and r.stdout == ""
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "cmd",
    [
        lambda run, bad: ["plan", "--params", "1e8", "--gpus", "1", "--write-config", bad / "c.yaml"],
        lambda run, bad: ["export", run, bad / "m.safetensors"],
        lambda run, bad: ["export", run, bad / "hf", "--no-check"],
        lambda run, bad: ["compress", run, "--out", bad / "c"],
    ],
)
def test_an_output_that_cannot_be_made_is_one_line_before_any_work(run, unchanged, cmd):
    # /proc takes no new folders, even from root (os.access says it may): the path is tried, not assumed
    bad = Path("/proc/scaletrain-no-such-folder")
    args = cmd(run, bad)
    r = run_cli(*args)
    err = one_line_error(r)
    assert "cannot write in /proc (" in err and "give a writable path" in err and r.stdout == ""
    assert not bad.exists()


def test_export_follows_the_latest_pointer_and_the_checkpoints_folder(run, unchanged, tmp_path):
    from safetensors import safe_open

    def weights(f):
        with safe_open(str(f), "pt") as g:
            return g.metadata()["step"], {k: g.get_tensor(k) for k in g.keys()}

    outs = []
    for src in (run, run / "checkpoints" / "latest", run / "checkpoints"):
        o = tmp_path / f"{len(outs)}.safetensors"
        r = run_cli("export", src, o)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(weights(o))
    step, ref = outs[0]
    assert step == "2"
    for s, w in outs[1:]:
        assert s == step and w.keys() == ref.keys() and all((w[k] == ref[k]).all() for k in ref)

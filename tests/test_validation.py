"""Hostile input is refused in one line, before anything is written: paths that would leave run.out_dir, non-finite
or out-of-range numbers, a device or memory that is not there, data with no text, a binary config file, a broken
command line. Each case failed (accepted, or a traceback, or a run folder left behind) before validation was one
mechanism (the field declarations of scaletrain.config, scaletrain.jobs.check_run)."""

import pytest
from conftest import run_cli, tiny
from scaletrain.config import load_config
from scaletrain.data import stdlib_files
from scaletrain.errors import ConfigError


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("scaletrain: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "override, expect",
    [
        ("model.dropout=nan", "model.dropout=nan: must be a finite number"),
        ("train.beta1=nan", "train.beta1=nan: must be a finite number"),
        ("train.min_lr_ratio=.nan", "train.min_lr_ratio=nan: must be a finite number"),
        ("train.lr=inf", "train.lr=inf: must be a finite number"),
        ("train.lr=1e308", "train.lr=1e+308: must be <= 10.0"),
        ("train.weight_decay=inf", "train.weight_decay=inf: must be a finite number"),
        ("train.grad_clip=nan", "train.grad_clip=nan: must be a finite number"),
        ("train.grad_clip=inf", "train.grad_clip=inf: must be a finite number"),
        ("run.peak_tflops=nan", "run.peak_tflops=nan: must be a finite number"),
        (f"train.seed={2**63}", f"train.seed={2**63}: must be <= {2**63 - 1}"),
        ("data.source=stdlib:inf", "weight inf of 'stdlib' must be a finite number > 0"),
    ],
)
def test_non_finite_and_out_of_range_values_are_refused(override, expect):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert expect in str(e.value) and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("name", ["../x", "../../x", "/abs/x", "a/b", ".", "..", "x" * 300])
def test_run_names_that_leave_out_dir_are_refused_and_nothing_is_written(tmp_path, name):
    out = tmp_path / "runs" / "sub"
    err = one_line_error(run_cli("train", f"run.out_dir={out}", f"run.name={name}", cwd=tmp_path))
    assert "run.name=" in err and "must be a single folder name" in err
    assert not any(tmp_path.iterdir())  # not runs/, not ../x, nothing


def test_absolute_name_never_creates_a_folder_there(tmp_path):
    target = tmp_path / "elsewhere"
    one_line_error(run_cli("train", f"run.out_dir={tmp_path / 'runs'}", f"run.name={target}"))
    assert not target.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["run.out_dir=/proc"], "run.out_dir=/proc: cannot create a run folder in it"),
        (["train.device=cuda"], "train.device='cuda': no CUDA GPU is visible here"),
        (["model.n_embd=1048576", "model.n_layer=4096"], "lower model.n_layer=4096 or model.n_embd=1048576"),
        (["train.micro_batch=100000000"], "lower train.micro_batch=100000000"),
    ],
)
def test_environment_and_resources_are_checked_before_anything_is_allocated(tmp_path, corpus, cache_dir, extra, expect):
    import torch

    if "train.device=cuda" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    out = tmp_path / "runs"
    err = one_line_error(run_cli("train", *tiny(corpus, cache_dir, out, *extra)))
    assert expect in err
    assert not out.exists()


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path, corpus):
    f = tmp_path / "afile"
    f.write_text("x")
    err = one_line_error(run_cli("train", *tiny(corpus, f, tmp_path / "runs")))
    assert f"data.cache_dir='{f}'" in err and "is not a folder" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["binary", "empty"])
def test_data_without_text_is_one_line_and_leaves_no_run_folder(tmp_path, cache_dir, kind):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}.txt").write_bytes(b"\0\1\2binary" * 50 if kind == "binary" else b"")
    out = tmp_path / "runs"
    r = run_cli("train", *tiny(src, cache_dir, out))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()[-1]  # above it: the tokenizer's progress bars
    assert err.startswith("scaletrain: error: ") and "no text in its 4 files" in err, err
    assert not out.exists()


def test_a_binary_config_file_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(bytes(range(256)) * 4)
    err = one_line_error(run_cli("train", "--config", cfg, f"run.out_dir={tmp_path / 'runs'}"))
    assert "not a text file" in err and str(cfg) in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args",
    [["train", "--nproc", "many"], ["_rank"], ["_rank_finetune", "--bogus"], ["plan", "--gpus", "x"]],
)
def test_every_parser_error_is_the_same_one_line(args):
    err = one_line_error(run_cli(*args))
    assert "(see --help)" in err


def test_the_stdlib_corpus_never_walks_installed_packages():
    files = stdlib_files()
    assert files and not any({"site-packages", "dist-packages"} & set(p.parts) for p in files)
    assert any(p.name == "argparse.py" for p in files)

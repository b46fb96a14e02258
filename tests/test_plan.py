"scaletrain plan: a ranked table of layouts that fit, one-line refusals, and a config that trains."

import contextlib
import io
import pytest
from conftest import run_cli, tiny
from scaletrain.config import load_config
from scaletrain.memory import estimate_config, GiB
from scaletrain.parallel import check
from scaletrain.cli import plan_main
from scaletrain.plan import plan, best_layouts
from scaletrain.train import Trainer


def plan_cli(*argv):
    "Run plan_main in this process: (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = plan_main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def rows(text):
    return [
        l.split()
        for l in text.splitlines()
        if len(l.split()) >= 14 and l.split()[0].isdigit() and l.split()[1] in ("ddp", "zero1", "zero2", "fsdp")
    ]


def test_cli_7b_on_8_h100_prints_a_ranked_table():
    r = run_cli("plan", "--params", "7e9", "--gpus", "8", "--gpu-mem", "80")
    assert r.returncode == 0, r.stderr
    table = rows(r.stdout)
    assert len(table) == 10 and [int(t[0]) for t in table] == list(range(1, 11))
    steps = [float(t[-4]) for t in table]
    assert steps == sorted(steps)
    assert all(float(t[-5]) <= 72.0 for t in table)  # GiB per GPU within 90 % of 80
    assert "7.06B params" in r.stdout and "Best:" in r.stdout


def test_every_listed_layout_fits_runs_and_matches_the_estimator():
    pl = plan(params=7e9, gpus=16, nodes=2, gpu_mem=80)
    assert pl.layouts and pl.considered > len(pl.layouts)
    for l in pl.layouts:
        cfg = pl.to_config(l)
        check(cfg, 16)  # scaletrain.parallel would run it
        assert estimate_config(cfg, 16).total == l.memory <= 80 * GiB * 0.9  # the config it writes predicts the same
        assert l.micro_batch * l.grad_accum * l.dp == 1024
    # the gradient all-reduce of plain DDP crosses the slow inter-node link; more bandwidth there makes it cheaper
    kw = dict(params=1e9, gpus=16, nodes=2, gpu_mem=80, strategies=("ddp",), ac_policies=("none",), overlap=0.0)
    slow = plan(**kw)
    fast = plan(**kw, links=dict(inter=type(slow.gpu.inter)(400e9, 10e-6)))
    ddp = lambda p: next(l for l in p.layouts if l.strategy == "ddp" and l.dp == 16)
    assert ddp(fast).step_time < ddp(slow).step_time


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--params", "7e9", "--gpus", "0"], "--gpus=0"),
        (["--params", "7e9", "--gpu-mem", "-1"], "--gpu-mem=-1"),
        (["--params", "7e9", "--gpus", "x"], "--gpus"),
        (["--params", "7e9", "--gpus", "8", "--nodes", "3"], "--nodes=3"),
        (["--params", "7e9", "--mfu", "1.5"], "--mfu"),
        (["--params", "7e9", "--gpu", "TPU"], "--gpu=TPU"),
        (["--params", "7e9", "--precision", "fp8"], "--precision=fp8"),
        (["--gpus", "8"], "--params N or --config FILE"),
        (["--params", "7e9", "model.n_layer=2"], "describe the model twice"),
        (["model.n_layr=2"], "did you mean 'model.n_layer'"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle):
    rc, out, err = plan_cli(*argv)
    assert rc == 2 and not out
    assert len(err.strip().splitlines()) == 1 and err.startswith("scaletrain: error: ") and needle in err


def test_nothing_fits_names_the_largest_part_and_the_fix():
    rc, out, err = plan_cli("--params", "70e9", "--gpus", "8", "--gpu-mem", "80")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "largest part is optimizer" in err and "would fit on 32 GPUs" in err and "--gpu-mem >=" in err
    rc, out, _ = plan_cli("--params", "70e9", "--gpus", "32", "--gpu-mem", "80", "--top", "3")
    assert rc == 0 and len(rows(out)) == 3


def test_written_config_trains_and_is_never_overwritten(tmp_path, corpus, cache_dir):
    f = tmp_path / "best.yaml"
    # the default family, with grouped-query attention (2 query heads share 1 key/value head)
    shape = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=1", "model.block_size=32"]
    rc, out, err = plan_cli(*shape, "--gpus", "1", "--gpu-mem", "1", "--global-batch", "8", "--write-config", f)
    assert rc == 0, err
    cfg = load_config(f)
    assert (cfg.model.family, cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_kv_head) == ("llama", 2, 32, 1)
    assert cfg.model.block_size == 32
    assert cfg.train.micro_batch * cfg.train.grad_accum == 8 and "scaletrain train --config" in out
    before = f.read_text()
    rc, _, err = plan_cli(*shape, "--gpus", "1", "--gpu-mem", "1", "--write-config", f, "--precision", "fp32")
    assert rc == 2 and "already exists" in err and f.read_text() == before
    rc, _, _ = plan_cli(
        *shape,
        "--gpus",
        "1",
        "--gpu-mem",
        "1",
        "--global-batch",
        "8",
        "--write-config",
        f,
        "--precision",
        "fp32",
        "--force",
    )
    assert rc == 0 and load_config(f).memory.precision == "fp32"
    data = [
        o
        for o in tiny(corpus, cache_dir, tmp_path / "runs")
        if o.split("=")[0].startswith(("data.", "run.", "train.device"))
    ]
    s = Trainer(load_config(f, data + ["train.steps=2", "train.warmup_steps=1", "train.eval_iters=1"])).fit()
    assert s["status"] == "finished" and s["global_batch"] == 8


def test_scaling_table_from_8_to_4096_gpus():
    t = {(r["params"], r["gpus"]): r for r in best_layouts((1e9, 70e9), (8, 4096), global_batch=2048)}
    assert t[(1e9, 8)]["gib"] and t[(70e9, 4096)]["gib"] and t[(70e9, 8)]["layout"] == "nothing fits"
    assert t[(1e9, 4096)]["tokens_per_s"] > t[(1e9, 8)]["tokens_per_s"]


def test_layouts_from_a_base_config_keep_its_settings_runnable():
    # a base config with its own validation batch: every layout written back must pass the launch checks,
    # pipeline layouts included (their validation batch is split into pipeline micro-batches too)
    base = load_config(
        overrides=[
            "model.n_layer=24",
            "model.n_embd=2048",
            "model.n_head=16",
            "model.block_size=2048",
            "model.vocab_size=50304",
            "model.tie_weights=false",
            "train.eval_batch=4",
        ]
    )
    pl = plan(base, gpus=16, nodes=2, gpu_mem=24, global_batch=256)
    assert pl.layouts and any(l.pp > 1 and l.microbatches > l.pp for l in pl.layouts)
    for l in pl.layouts:
        check(pl.to_config(l), 16)


@pytest.mark.parametrize("kv,ffn,tps", [(2, 1536, {1, 2}), (8, 1380, {1, 2, 4}), (8, 1536, {1, 2, 4, 8})])
def test_llama_layouts_keep_the_shape_and_tp_divides_heads_and_ffn(kv, ffn, tps):
    # 16 query heads; tensor parallelism must split the key/value heads and the FFN width too (1380 = 4 x 345)
    base = load_config(
        overrides=[
            "model.family=llama",
            "model.n_layer=4",
            "model.n_embd=512",
            "model.n_head=16",
            f"model.n_kv_head={kv}",
            f"model.ffn_dim={ffn}",
            "model.block_size=256",
            "model.vocab_size=1000",
        ]
    )
    pl = plan(base, gpus=8, gpu_mem=1000, global_batch=64)
    assert {l.tp for l in pl.layouts} == tps
    for l in pl.layouts:
        cfg = pl.to_config(l)
        check(cfg, 8)
        m = cfg.model
        assert (m.family, m.n_head, m.n_kv_head, m.ffn_dim, m.n_embd, m.block_size) == ("llama", 16, kv, ffn, 512, 256)
        assert estimate_config(cfg, 8).total == l.memory  # the written config is the planned shape
    assert f"heads 16 ({kv} key/value), swiglu FFN {ffn}" in pl.header()


def test_a_shape_its_family_cannot_build_is_refused():
    from dataclasses import replace
    from scaletrain.config import ConfigError
    from scaletrain.models.spec import get_spec

    good = get_spec("llama").shape(load_config(overrides=["model.vocab_size=300"]).model)
    with pytest.raises(ConfigError, match="model.family=llama does not build a shape with ffn='gelu'"):
        plan(replace(good, ffn="gelu"), gpus=1, gpu_mem=10, global_batch=4)
    gpt = get_spec("gpt").shape(load_config(overrides=["model.family=gpt", "model.vocab_size=300"]).model)
    with pytest.raises(ConfigError, match="model.family=gpt does not build a shape with n_kv_head=2$"):
        plan(replace(gpt, n_kv_head=2), gpus=1, gpu_mem=10, global_batch=4)

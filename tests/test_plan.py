"scaletrain plan: a ranked table of layouts that fit, one-line refusals, and a config that trains."

import contextlib
import io
import json
import re
import pytest
from conftest import run_cli, tiny
from scaletrain.config import ConfigError, load_config
from scaletrain.errors import CheckpointError
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
        if len(l.split()) >= 18 and l.split()[0].isdigit() and l.split()[1] in ("ddp", "zero1", "zero2", "fsdp", "hsdp")
    ]


def test_cli_7b_on_8_h100_prints_a_ranked_table():
    r = run_cli("plan", "--params", "7e9", "--gpus", "8", "--gpu-mem", "80")
    assert r.returncode == 0, r.stderr
    table = rows(r.stdout)
    assert len(table) == 10 and [int(t[0]) for t in table] == list(range(1, 11))
    steps = [float(t[11]) for t in table]
    assert steps == sorted(steps)
    assert all(float(t[10]) <= 72.0 for t in table)  # GiB per GPU within 90 % of 80
    assert "7.06B params" in r.stdout and "Best:" in r.stdout


def test_llama3_70b_on_1024_h100_prints_3d_layouts_the_bill_and_a_config_train_accepts(tmp_path):
    f = tmp_path / "l70.yaml"
    argv = ["--preset", "llama3-70b", "--gpus", "1024", "--gpu", "h100-80gb", "--tokens", "15e12"]
    rc, out, err = plan_cli(*argv, "--write-config", f)
    assert rc == 0, err
    table = rows(out)
    assert len(table) == 10 and any(int(t[3]) > 1 and int(t[5]) > 1 for t in table)  # tp x pp
    for col in ("GiB/GPU", "step s", "MFU", "days", "GPU-h", "kWh", "t CO2", "cost $"):
        assert col in out
    assert "70.55B params" in out and "vocab 128256" in out and "1.5e+13 tokens" in out
    cfg = load_config(f)
    assert (cfg.model.family, cfg.model.n_layer, cfg.model.vocab_size, cfg.model.n_kv_head) == ("llama", 80, 128256, 8)
    assert cfg.model.ffn_dim in (0, 28672) and cfg.model.rope_theta == 500000.0
    dims = check(cfg, 1024)  # the launch checks: scaletrain train accepts it
    assert dims.dp * cfg.train.micro_batch * cfg.train.grad_accum == 1024
    pl = plan(load_config(f).model, gpus=1024, tokens=15e12)
    assert pl.layouts[0].bill.days > 0 and "wrote" in out
    # every layout the planner prints, context parallel ones included, is one scaletrain train runs
    assert all(l.runnable for l in pl.layouts) and any(l.cp > 1 for l in pl.layouts[:10])
    # a planning-only precision (the ZeRO paper's accounting) plans, but its config is refused in one line, unwritten
    g = tmp_path / "no.yaml"
    rc, out, err = plan_cli(*argv, "--precision", "bf16-master", "--write-config", g, "--row", 1)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cannot write" in err and not g.exists()


@pytest.mark.parametrize("gpus", [8, 24, 64])
@pytest.mark.parametrize("batch", [7, 96, 100, 1000, 1536])
def test_every_layout_trains_exactly_the_global_batch(gpus, batch):
    pl = plan(params=1.3e9, gpus=gpus, global_batch=batch, gpu_mem=80)
    for l in pl.layouts:
        assert l.micro_batch * l.grad_accum * l.dp == batch == l.global_batch, l.describe()
        if l.pp > 1:
            assert l.micro_batch % l.microbatches == 0
    listed = {(l.dp, l.tp, l.cp, l.pp) for l in pl.layouts}
    for where, why in pl.infeasible:
        assert why  # every layout left out says why
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 3, 4):
            if gpus % (tp * pp) or pp > pl.shape.n_layer:
                continue
            dp = gpus // (tp * pp)
            if batch % dp:
                assert (dp, tp, 1, pp) not in listed
                assert any(
                    w.startswith(f"dp={dp} tp={tp} cp=1 pp={pp}") and f"not divisible by dp={dp}" in y
                    for w, y in pl.infeasible
                )
    if batch == 96 and gpus == 8:  # non-power-of-two micro-batches: 96 / 8 = 12 per rank
        assert any(l.micro_batch in (3, 6, 12) for l in pl.layouts)


def test_3d_and_4d_layouts_keep_tp_inside_a_node():
    pl = plan(shape_of("llama3-405b", seq=131072), gpus=16384, gpu="h100-80gb", global_batch=128)
    kinds = {(l.strategy, l.tp > 1, l.pp > 1, l.cp > 1) for l in pl.layouts}
    assert any(tp and pp for _, tp, pp, _ in kinds) and any(cp for *_, cp in kinds)
    assert any(s in ("fsdp", "zero2") and pp for s, _, pp, _ in kinds)
    pl64 = plan(params=7e9, gpus=64, gpu_mem=80)
    hsdp = [l for l in pl64.layouts if l.strategy == "hsdp"]
    assert hsdp and all(l.dp_shard * l.tp * l.cp == 8 and l.dp % l.dp_shard == 0 for l in hsdp)
    assert all(l.tp <= 8 for l in pl.layouts) and all(l.dp * l.tp * l.cp * l.pp == 16384 for l in pl.layouts)
    # context parallelism, hsdp, tp x pp and FSDP2 x pp run (tests/test_context_parallel.py, test_layouts_3d.py):
    # every layout is runnable; a strategy that does not compose with tp or pp is left out, saying why
    assert all(l.runnable for l in pl.layouts) and any(l.cp > 1 and l.pp > 1 and l.tp > 1 for l in pl.layouts)
    assert any(w.startswith("ddp ") and "does not compose with tensor parallelism" in y for w, y in pl.infeasible)
    assert all(l.runnable for l in hsdp) and any(l.runnable and l.tp > 1 and l.pp > 1 for l in pl64.layouts)
    assert any(l.runnable and l.tp > 1 and l.pp > 1 and l.strategy == "fsdp" and l.dp > 1 for l in pl64.layouts)
    assert any(l.runnable and l.strategy == "zero2" and l.pp > 1 and l.dp > 1 for l in pl64.layouts)
    for l in hsdp:  # the config it writes is the planned 2-D data-parallel mesh, and estimates the same
        cfg = pl64.to_config(l)
        dims = check(cfg, 64)
        assert (cfg.parallel.strategy, dims.dp_shard, dims.dp_replicate) == ("hsdp", l.dp_shard, l.dp // l.dp_shard)
        assert estimate_config(cfg, 64).total == l.memory


def shape_of(name, seq=None):
    from scaletrain.models.spec import get_spec
    from scaletrain.plan import preset

    m = preset(name)
    return get_spec(m.family).shape(m, seq)


def test_presets_flags_and_hf_config_give_the_published_shapes(tmp_path):
    from scaletrain.plan import PUBLISHED_PARAMS

    for name, n in PUBLISHED_PARAMS.items():
        assert abs(shape_of(name).n_params() / n - 1) < 0.003, name
    flags = "--family llama --layers 32 --hidden 4096 --heads 32 --kv-heads 8 --ffn 14336 --vocab 128256 --seq-len 8192"
    rc, by_flags, err = plan_cli(*flags.split(), "--gpus", "8", "--top", "1")
    assert rc == 0, err
    hf = dict(
        model_type="llama",
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        rope_scaling={"rope_type": "llama3", "factor": 8.0},
    )
    (tmp_path / "config.json").write_text(json.dumps(hf))
    rc, by_hf, err = plan_cli("--hf-config", tmp_path, "--gpus", "8", "--top", "1")
    assert rc == 0, err
    rc, by_preset, _ = plan_cli("--preset", "llama3-8b", "--gpus", "8", "--top", "1")
    first = lambda t: t.splitlines()[0]
    assert first(by_flags) == first(by_hf) == first(by_preset) and "8.03B params" in first(by_preset)


def test_an_explicit_vocabulary_is_written(tmp_path):
    f = tmp_path / "v.yaml"
    rc, out, err = plan_cli(
        "model.n_layer=2",
        "model.n_embd=64",
        "--vocab",
        "128256",
        "--gpus",
        "1",
        "--global-batch",
        "8",
        "--write-config",
        f,
    )
    assert rc == 0, err
    assert load_config(f).model.vocab_size == 128256 and "vocab 128256" in out


def test_every_listed_layout_fits_and_the_runnable_ones_match_the_estimator():
    pl = plan(params=7e9, gpus=16, nodes=2, gpu_mem=80)
    assert pl.layouts and pl.considered > len(pl.layouts)
    assert all(l.runnable for l in pl.layouts)
    master = plan(params=7e9, gpus=16, nodes=2, gpu_mem=80, precision="bf16-master")  # planning-only accounting
    assert master.layouts and not any(l.runnable for l in master.layouts)
    for l in pl.layouts + master.layouts[:3]:
        assert l.memory <= 80 * GiB * 0.9 and l.micro_batch * l.grad_accum * l.dp == 1024
        if l.runnable:
            cfg = pl.to_config(l)
            check(cfg, 16)  # scaletrain.parallel would run it
            assert estimate_config(cfg, 16).total == l.memory  # the config it writes predicts the same
        else:
            with pytest.raises(ConfigError, match="cannot write.*planning-only"):
                master.to_config(l)
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
        (["--params", "7e9", "--pue", "0.5"], "--pue=0.5"),
        (["--params", "7e9", "--price", "-1"], "--price=-1"),
        (["--params", "7e9", "--tokens", "0"], "--tokens=0"),
        (["--preset", "gpt5"], "--preset=gpt5"),
        (["--preset", "llama3-8b", "--params", "7e9"], "describe the model twice"),
        (["--layers", "4", "--params", "1e9"], "need --family"),
        (["--family", "llama", "--layers", "4"], "needs --hidden"),
        (["--hf-config", "/nonexistent/config.json"], "--hf-config=/nonexistent/config.json"),
        (["--gpus", "8"], "--params N, --preset NAME"),
        (["--params", "7e9", "model.n_layer=2"], "describe the model twice"),
        (["model.n_layr=2"], "did you mean 'model.n_layer'"),
        (["model.family=hf", "model.hf_path=/nonexistent/folder"], "model.hf_path='/nonexistent/folder': no config"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle):
    rc, out, err = plan_cli(*argv)
    assert rc == 2 and not out
    assert len(err.strip().splitlines()) == 1 and err.startswith("scaletrain: error: ") and needle in err


def test_nothing_fits_names_the_largest_part_and_the_fix():
    rc, out, err = plan_cli("--params", "70e9", "--gpus", "8", "--gpu-mem", "80")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "largest part is optimizer" in err and "would fit on" in err and "--gpu-mem >=" in err
    rc, out, _ = plan_cli("--params", "70e9", "--gpus", "32", "--gpu-mem", "80", "--top", "3")
    assert rc == 0 and len(rows(out)) == 3
    rc, out, err = plan_cli("--params", "1e15", "--gpus", "16384", "--global-batch", "16384")  # absurd: one line
    assert rc == 2 and "nothing fits" in err and len(err.strip().splitlines()) == 1


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
    assert pl.layouts and any(l.pp > 1 and l.microbatches > l.pp and l.runnable for l in pl.layouts)
    for l in pl.layouts:
        if l.runnable:
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
    for l in [l for l in pl.layouts if l.runnable]:
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


def test_every_printed_row_runs_and_a_planning_only_plan_says_so(capsys):
    """Every row of a real plan, context-parallel 3-D layouts included, is one scaletrain train runs ('y'), and
    --runnable changes nothing; a planning-only precision plans, is marked '-', and --runnable refuses it in one
    line."""
    args = ["--preset", "llama3-70b", "--gpus", "1024", "--gpu", "h100-80gb", "--tokens", "15e12"]
    assert plan_main(args) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if re.match(r"\s*\d+ (ddp|zero1|zero2|fsdp|hsdp) ", l)]
    assert len(rows) == 10 and all(l.rstrip().endswith("y") for l in rows), rows[:3]
    assert " cp=2 " in out.split("Best: ")[1].split(":")[0] and "Best that scaletrain train runs" not in out
    assert plan_main([*args, "--runnable"]) == 0
    again = [l for l in capsys.readouterr().out.splitlines() if re.match(r"\s*\d+ (ddp|zero1|zero2|fsdp|hsdp) ", l)]
    assert again == rows
    assert plan_main([*args, "--precision", "bf16-master"]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if re.match(r"\s*\d+ (ddp|zero1|zero2|fsdp|hsdp) ", l)]
    assert rows and all(l.rstrip().endswith("-") for l in rows)
    with pytest.raises(SystemExit) as e:
        plan_main([*args, "--precision", "bf16-master", "--runnable"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--runnable: none of the layouts" in err[0], err
    assert "planning-only" in err[0]


def _by_ac(pl, ac):
    return [l for l in pl.layouts if l.ac == ac]


def test_an_hf_folder_config_is_planned_as_its_run_reads_it(tmp_path):
    # `scaletrain plan --config` with model.family=hf: the folder's shape (as `resolve_hf` reads it for the run), the
    # transformers class's own rules, and a written config that keeps the family and the folder and launches
    from hf_family_helpers import save_tiny
    from scaletrain.models.hub import resolve_hf

    folder = save_tiny("hf_llama", tmp_path / "llama", vocab=300)
    (tmp_path / "hf.yaml").write_text(f"model:\n  family: hf\n  hf_path: {folder}\n")
    out = tmp_path / "planned.yaml"
    rc, text, err = plan_cli("--config", tmp_path / "hf.yaml", "--gpus", "4", "--global-batch", "8", "--write", out)
    assert rc == 0, err
    assert "hf (llama layout)" in text and "layers 4, hidden 32, heads 4 (2 key/value)" in text and "vocab 300" in text
    written = load_config(out)
    assert (written.model.family, written.model.hf_path, written.model.n_layer) == ("hf", str(folder), 4)
    check(resolve_hf(written), 4)  # the trainer's launch check, on the folder as the run reads it
    pl = plan(load_config(tmp_path / "hf.yaml"), gpus=4, global_batch=8)
    assert all(l.runnable for l in pl.layouts) and any(l.tp > 1 for l in pl.layouts)
    for l in pl.layouts:
        check(resolve_hf(pl.to_config(l)), 4)
    # the transformers layers have no sequence-parallel form: never planned (our llama of the same shape has it)
    assert not any(l.sp for l in pl.layouts)
    ours = plan(pl.shape, gpus=4, global_batch=8)
    assert any(l.sp for l in ours.layouts)
    # memory.selective_compile=auto compiles selective's blocks on a GPU for our families only, not for a
    # transformers class: the planner's memory follows the run's rule (`parallel.blocks_compiled`)
    assert _by_ac(pl, "selective") and not any(l.estimate.inputs["compiled"] for l in _by_ac(pl, "selective"))
    assert all(l.estimate.inputs["compiled"] for l in _by_ac(ours, "selective"))
    assert not any(l.estimate.inputs["compiled"] for l in _by_ac(ours, "none") + _by_ac(ours, "full"))
    # a transformers GPT-2 cannot be cut by heads (its fused Conv1D): tensor-parallel layouts say so, others run
    gpt2 = save_tiny("hf_gpt2u", tmp_path / "gpt2", vocab=300)
    pl2 = plan(load_config(overrides=["model.family=hf", f"model.hf_path={gpt2}"]), gpus=4, global_batch=8)
    assert any(l.runnable for l in pl2.layouts)
    assert all(not l.runnable and "Conv1D" in l.why_not for l in pl2.layouts if l.tp > 1)


@pytest.mark.parametrize("family", ["llama", "hf"])
def test_a_model_is_planned_from_its_config_json_alone(tmp_path, family):
    # the weights are not needed to plan (a 70B model is planned before it is downloaded); the run still needs them
    from hf_family_helpers import save_tiny
    from scaletrain.jobs import prepare_run

    folder = save_tiny("hf_llama", tmp_path / "llama", vocab=300)
    (folder / "model.safetensors").unlink()
    (tmp_path / "c.yaml").write_text(f"model:\n  family: {family}\n  hf_path: {folder}\n")
    rc, text, err = plan_cli("--config", tmp_path / "c.yaml", "--gpus", "4", "--global-batch", "8")
    assert rc == 0, err
    assert "layers 4, hidden 32, heads 4 (2 key/value)" in text
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        prepare_run(tmp_path / "c.yaml", [f"run.out_dir={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()


def _base(*extra):
    return load_config(
        overrides=[
            "model.family=llama",
            "model.n_layer=16",
            "model.n_embd=2048",
            "model.n_head=16",
            "model.n_kv_head=4",
            "model.block_size=2048",
            "model.vocab_size=128256",
            "model.tie_weights=false",
            *extra,
        ]
    )


def test_the_plan_asks_its_base_config_what_compiles_and_how_the_loss_is_computed():
    # the planner's memory is `estimate_config` of the config each layout would run: a base config's train.compile,
    # memory.chunked_loss and memory.loss_chunk change the numbers as they change the run
    kw = dict(gpus=8, gpu_mem=80, global_batch=64)
    plans = {
        name: plan(_base(*extra), **kw)
        for name, extra in dict(
            default=[],
            compile=["train.compile=true"],
            off=["memory.chunked_loss=off"],
            chunk=["memory.loss_chunk=1024"],
            on=["memory.chunked_loss=on"],
        ).items()
    }
    for pl in plans.values():
        assert pl.layouts
        for l in pl.layouts:
            if l.runnable:  # the config it writes predicts the same memory
                assert estimate_config(pl.to_config(l), 8).total == l.memory
    inputs = {name: [l.estimate.inputs for l in pl.layouts] for name, pl in plans.items()}
    flat = lambda name: [i for i in inputs[name] if i["tp"] == i["pp"] == 1]
    # the default chunks the loss where it applies (no tp, no pipeline) and compiles only selective's blocks
    assert flat("default") and all(i["loss_chunk"] > 0 for i in flat("default"))
    assert all(i["loss_chunk"] == 0 for i in inputs["default"] if i["tp"] > 1 or i["pp"] > 1)
    assert all(i["compiled"] == (i["ac"] == "selective") and not i["compiled_loss"] for i in inputs["default"])
    # train.compile: every block and the loss compiled, which inductor fuses instead of chunking
    assert all(i["compiled"] and i["compiled_loss"] and i["loss_chunk"] == 0 for i in inputs["compile"])
    assert all(i["loss_chunk"] == 0 for i in inputs["off"])
    assert all(i["loss_chunk"] == 1024 for i in flat("chunk"))
    lays = lambda name: {l.describe(): l.memory for l in plans[name].layouts}
    for name in ("compile", "off", "chunk"):
        shared = lays("default").keys() & lays(name).keys()
        assert shared and any(lays("default")[k] != lays(name)[k] for k in shared), name
    # memory.chunked_loss=on where a layout cannot chunk (tp or a pipeline): the run refuses it, so does the plan
    on = plans["on"].layouts
    assert any(l.tp > 1 or l.pp > 1 for l in on) and any(l.runnable for l in on)
    for l in on:
        if l.tp > 1 or l.pp > 1:
            assert not l.runnable and "memory.chunked_loss=on" in l.why_not, l.describe()
        else:
            assert l.runnable and l.estimate.inputs["loss_chunk"] > 0


def test_fp8_plans_faster_linears_only_where_float8_runs():
    from scaletrain.plan import FP8_SPEEDUP

    kw = dict(params=7e9, gpus=8, gpu="h100-80gb", strategies=("fsdp",), ac_policies=("none", "full"))
    bf, f8 = plan(**kw), plan(**kw, precision="fp8-mixed")
    by = {l.describe(): l for l in bf.layouts}
    same = [(by[l.describe()], l) for l in f8.layouts if l.describe() in by]
    assert same
    for b, f in same:  # the same layout: less compute, never below what speeding up every FLOP would give
        assert b.compute_time / FP8_SPEEDUP["tensorwise"] < f.compute_time < b.compute_time, f.describe()
        assert f.memory == b.memory and f.runnable  # bf16-mixed's states and activations; the trainer runs it
    assert "the blocks' Linear matmuls at 1.38x" in f8.header() and "not measured by scaletrain" in f8.header()
    rowwise = plan(load_config(overrides=["memory.fp8_scaling=rowwise"]), gpus=8, precision="fp8-mixed")
    assert "fp8-mixed (rowwise)" in rowwise.header()
    assert f8.to_config(f8.layouts[0]).memory.precision == "fp8-mixed"


def test_written_config_is_the_billed_run(tmp_path):
    f = tmp_path / "c.yaml"
    argv = ["--params", "1e8", "--gpus", "8", "--tokens", "3e9", "--price", "3.5", "--pue", "1.3", "--grid", "0.2"]
    rc, out, err = plan_cli(*argv, "--global-batch", "512", "--write-config", f)
    assert rc == 0, err
    cfg = load_config(f)
    steps = -(-3e9 // (512 * 2048))  # every token of the bill, in whole steps
    assert cfg.train.steps == steps and f"train.steps={steps:.0f} for 3e+09 tokens" in out
    assert (cfg.run.price_per_device_hour, cfg.run.pue, cfg.run.grid_gco2_per_kwh) == (3.5, 1.3, 200.0)
    pl = plan(params=1e8, gpus=8, tokens=3e9, global_batch=512)
    assert pl.layouts[0].bill.steps == steps
    # a budget of fewer steps than the warm-up: the warm-up is cut to fit, so the config still loads
    g = tmp_path / "short.yaml"
    rc, out, err = plan_cli(*argv, "--tokens", "1e7", "--global-batch", "512", "--write-config", g)
    assert rc == 0, err
    assert load_config(g).train.steps == 10 and load_config(g).train.warmup_steps == 10


def test_small_and_huge_numbers_stay_readable():
    rc, out, err = plan_cli("--params", "1e8", "--global-batch", "3", "--top", "1")
    assert rc == 0, err
    (row,) = rows(out)
    assert float(row[11]) > 0  # a step of a few milliseconds is not printed as 0.00
    rc, out, err = plan_cli("--params", "1e8", "--tokens", "1e18", "--top", "1")
    assert rc == 0, err
    (row,) = rows(out)
    assert "e+" in row[13] and len(row[13]) <= 9 and float(row[13]) > 1e6  # days, in 3 significant digits

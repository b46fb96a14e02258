"""Every strategy equals single-process training: same per-step losses and final weights for the same
global batch (fp32, CPU, gloo), for both model families (gpt, and llama with grouped-query attention).
One torchrun launch runs all 2-process cases, another the 4-process 2-D ones."""

import json
import subprocess
from pathlib import Path
import pytest
import torch
from conftest import tiny, run_cli, ROOT
from scaletrain.config import load_config
from scaletrain.train import Trainer
from scaletrain.procs import torchrun_args, child_env
from scaletrain.checkpoint import latest_checkpoint
from scaletrain.models.spec import get_spec

STEPS, MICRO = 4, 4


def common(corpus, cache_dir):
    return tiny(
        corpus,
        cache_dir,
        "unused",
        f"train.steps={STEPS}",
        f"train.micro_batch={MICRO}",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "model.n_layer=4",
        "model.n_head=4",
        "train.eval_iters=2",
    )[3:]


# a tiny llama: RMSNorm, rotary, SwiGLU, and 2 key/value heads for 4 query heads (GQA; under tp=2 one kv head per rank)
LLAMA = ["model.family=llama", "model.bias=false", "model.n_kv_head=2"]


def with_llama(cases, skip=()):
    "Each GPT case again for the llama family (pipeline cases keep their tie_weights=false)."
    return cases + [(f"llama_{n}", LLAMA + o, dp) for n, o, dp in cases if n not in skip]


# name, overrides, data-parallel degree
CASES_2 = [
    ("ddp", ["parallel.strategy=ddp"], 2),
    ("ddp_accum", ["parallel.strategy=ddp", "train.grad_accum=2", "train.micro_batch=2"], 2),
    ("zero1_torch", ["parallel.strategy=zero1"], 2),
    ("zero1_fairscale", ["parallel.strategy=zero1", "parallel.backend=fairscale"], 2),
    ("zero2_torch", ["parallel.strategy=zero2"], 2),
    ("zero2_fairscale", ["parallel.strategy=zero2", "parallel.backend=fairscale"], 2),
    ("fsdp", ["parallel.strategy=fsdp", "train.grad_accum=2", "train.micro_batch=2"], 2),
    ("tp", ["parallel.tp=2"], 1),
    ("tp_sp", ["parallel.tp=2", "parallel.sequence_parallel=true"], 1),
    ("pp_gpipe", ["parallel.pp=2", "parallel.pp_schedule=gpipe", "model.tie_weights=false"], 1),
    ("pp_1f1b", ["parallel.pp=2", "parallel.pp_schedule=1f1b", "model.tie_weights=false"], 1),
    ("pp_interleaved", ["parallel.pp=2", "parallel.pp_schedule=interleaved1f1b", "model.tie_weights=false"], 1),
]
CASES_2 = with_llama(CASES_2, skip=("ddp_accum",))
CASES_4 = with_llama(
    [
        ("fsdp_x_tp", ["parallel.strategy=fsdp", "parallel.tp=2"], 2),
        ("ddp_x_pp", ["parallel.strategy=ddp", "parallel.pp=2", "model.tie_weights=false"], 2),
    ]
)
PRECISION = (
    [
        dict(
            name=f"prec_{s}_{p}",
            overrides=[f"parallel.strategy={s}", f"memory.precision={p}", "train.steps=6", "train.lr=3e-3"],
        )
        for s in ("ddp", "fsdp")
        for p in ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true")
    ]
    + [  # every precision for llama too, under fsdp (its mixed precision goes through FSDP2's MixedPrecisionPolicy)
        dict(
            name=f"prec_llama_fsdp_{p}",
            overrides=[*LLAMA, "parallel.strategy=fsdp", f"memory.precision={p}", "train.steps=6", "train.lr=3e-3"],
        )
        for p in ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true")
    ]
    + [
        # fp16 under ZeRO: torch's scaler over a sharded optimizer, and fairscale's ShardedGradScaler
        dict(
            name=f"prec_{n}_fp16-mixed", overrides=[*o, "memory.precision=fp16-mixed", "train.steps=6", "train.lr=3e-3"]
        )
        for n, o in (
            ("zero1", ["parallel.strategy=zero1"]),
            ("zero2_fairscale", ["parallel.strategy=zero2", "parallel.backend=fairscale"]),
        )
    ]
)
_LLAMA_FSDP = next(o for n, o, _ in CASES_2 if n == "llama_fsdp")
CKPT = [  # fsdp on 2 ranks: stop at 2 and resume to 4, against a straight run (ddp_... above are separate runs)
    dict(name="fsdp_straight", overrides=["parallel.strategy=fsdp"]),
    dict(name="fsdp_first", overrides=["parallel.strategy=fsdp"], stop_after=2),
    dict(name="fsdp_resumed", overrides=[], resume_of="fsdp_first"),
    # llama: the llama_fsdp case above is the straight run
    dict(name="llama_fsdp_first", overrides=_LLAMA_FSDP, stop_after=2),
    dict(name="llama_fsdp_resumed", overrides=[], resume_of="llama_fsdp_first"),
    # a ZeRO run resumed under a layout that does not shard the optimizer (its groups and moments, by name)
    dict(name="zero1_first", overrides=["parallel.strategy=zero1"], stop_after=2),
    dict(name="zero1_to_ddp", overrides=["parallel.strategy=ddp"], resume_of="zero1_first"),
    dict(name="zero2fs_first", overrides=["parallel.strategy=zero2", "parallel.backend=fairscale"], stop_after=2),
    dict(
        name="zero2fs_to_fsdp",
        overrides=["parallel.strategy=fsdp", "parallel.backend=torch"],
        resume_of="zero2fs_first",
    ),
]
RESUMES = {
    "gpt": ("fsdp_straight", "fsdp_first", "fsdp_resumed"),
    "llama": ("llama_fsdp", "llama_fsdp_first", "llama_fsdp_resumed"),
}


def launch(nproc, cases, corpus, cache_dir, out):
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps(dict(common=common(corpus, cache_dir), cases=cases)))
    cmd = torchrun_args([str(ROOT / "tests" / "dist_worker.py"), str(spec), str(out)], nproc=nproc)
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return out


def launched(world: int, cases, tag: str, extra=()):
    """A module-scoped fixture: `cases` ((name, overrides, ...) tuples) and `extra` (case dicts), trained once by one
    torchrun launch of `world` processes; its value is the launch's output folder."""

    @pytest.fixture(scope="module", name=tag)
    def fixture(tmp_path_factory, corpus, cache_dir):
        specs = [dict(name=n, overrides=o) for n, o, *_ in cases] + list(extra)
        return launch(world, specs, corpus, cache_dir, tmp_path_factory.mktemp(tag))

    return fixture


two = launched(2, CASES_2, "two", CKPT + PRECISION)
four = launched(4, CASES_4, "four")


def results(out, name, world):
    return [torch.load(out / name / f"rank{r}.pt", weights_only=False) for r in range(world)]


_REFERENCES = {}


def reference(corpus, cache_dir, tmp_path, overrides, dp):
    "The same global batch in one process and one large batch: micro-batch x accumulation x dp, no parallelism."
    cfg = load_config(
        overrides=common(corpus, cache_dir)
        + [o for o in overrides if not o.startswith("parallel.")]
        + [f"run.out_dir={tmp_path}"]
    )
    batch = int(cfg.train.micro_batch) * cfg.train.grad_accum * dp
    key = (
        tuple(o for o in overrides if not o.startswith(("parallel.", "train.micro_batch=", "train.grad_accum="))),
        batch,
    )
    if key not in _REFERENCES:  # several layouts share one single-process run
        cfg.train.micro_batch, cfg.train.grad_accum = batch, 1
        t = Trainer(cfg, default_callbacks=False)
        t.fit()
        _REFERENCES[key] = (
            [(r["loss"], r["grad_norm"]) for r in t.history],
            {k: v.detach().float() for k, v in t.model.state_dict().items()},
        )
    return _REFERENCES[key]


def assert_checkpoint_loads_in_one_process(out, name, w, family):
    """The case's final checkpoint, written by every rank of its layout, loads into a plain model of its family
    (built from the checkpoint's own config): the weights the ranks held."""
    from scaletrain.checkpoint import checkpoint_config, load_model_weights
    from scaletrain.models.spec import build_model

    run = Path((out / name / "run_dir.txt").read_text())
    c = checkpoint_config(run).model
    assert c.family == family, (name, c.family)
    m = build_model(c)
    load_model_weights(run, m)
    sd = m.state_dict()
    assert set(w) <= set(sd), set(w) - set(sd)
    for k, v in sd.items():
        if k in w:
            assert torch.equal(v.float(), w[k]), (name, k)


def merged_weights(res):
    w = {}
    for r in res:
        for k, v in r["weights"].items():
            if k in w:
                assert torch.allclose(w[k], v, atol=1e-6), f"ranks disagree on {k}"
            w[k] = v
    return w


# a tied head may be stored once, as the embedding
TIED_HEADS = {f"{get_spec(f).head}.weight" for f in ("gpt", "llama")}


def assert_equivalent(res, ref, ref_w, rtol):
    ref_losses, ref_norms = zip(*ref)
    for r in res:
        assert len(r["losses"]) == STEPS
        for a, b in zip(r["losses"], ref_losses):
            assert abs(a - b) <= rtol * abs(b), (r["engine"], r["losses"], ref_losses)
        # the global gradient norm (what clipping uses), gathered over shards, TP ranks and pipeline stages
        for a, b in zip(r["grad_norms"], ref_norms):
            assert abs(a - b) <= 10 * rtol * abs(b), (r["engine"], r["grad_norms"], ref_norms)
    w = merged_weights(res)
    keys = {k for k in ref_w if not (k in TIED_HEADS and k not in w)}
    assert keys <= set(w), set(ref_w) - set(w)
    for k in keys:
        assert torch.allclose(w[k], ref_w[k], rtol=1e-4, atol=2e-5), (k, (w[k] - ref_w[k]).abs().max())


# fp32 tolerances on the loss: DDP/ZeRO/FSDP only reorder the same sums (<=1e-6 relative);
# TP and PP split matmuls or micro-batches, summing partial results in another order (<=1e-5).
@pytest.mark.parametrize("name,overrides,dp", CASES_2, ids=[c[0] for c in CASES_2])
def test_two_process_strategy_equals_single_process(two, corpus, cache_dir, tmp_path, name, overrides, dp):
    res = results(two, name, 2)
    ref_l, ref_w = reference(corpus, cache_dir, tmp_path, overrides, dp)
    assert_equivalent(res, ref_l, ref_w, rtol=1e-5)
    cfg = load_config(overrides=common(corpus, cache_dir) + overrides)
    assert_checkpoint_loads_in_one_process(two, name, merged_weights(res), cfg.model.family)
    if cfg.parallel.tp > 1:  # each rank holds the Megatron split (llama: its share of the key/value heads)
        shape = get_spec(cfg.model.family).shape(cfg.model, vocab_size=257)
        split = 4 * (shape.n_layer * shape.block_params(cfg.parallel.tp) + shape.end_params(True, True))
        assert [r["param_bytes"] for r in res] == [split] * 2, name
    s = res[0]["summary"]
    assert (
        s["world_size"] == 2
        and s["dp"] == dp
        and s["global_batch"] == dp * int(cfg.train.micro_batch) * cfg.train.grad_accum
    )


@pytest.mark.parametrize("name,overrides,dp", CASES_4, ids=[c[0] for c in CASES_4])
def test_four_process_2d_equals_single_process(four, corpus, cache_dir, tmp_path, name, overrides, dp):
    res = results(four, name, 4)
    ref_l, ref_w = reference(corpus, cache_dir, tmp_path, overrides, dp)
    assert_equivalent(res, ref_l, ref_w, rtol=1e-5)
    family = load_config(overrides=common(corpus, cache_dir) + overrides).model.family
    assert_checkpoint_loads_in_one_process(four, name, merged_weights(res), family)
    assert res[0]["summary"]["world_size"] == 4 and res[0]["summary"]["dp"] == dp


@pytest.mark.parametrize("prefix", ["", "llama_"], ids=["gpt", "llama"])
def test_sharded_state_is_about_one_over_world(two, prefix):
    ddp = results(two, f"{prefix}ddp", 2)[0]
    for name in ("zero1_torch", "zero1_fairscale", "zero2_torch", "zero2_fairscale", "fsdp"):
        for r in results(two, prefix + name, 2):
            ratio = r["optim_bytes"] / ddp["optim_bytes"]
            assert 0.3 < ratio < 0.7, (name, ratio)  # ZeRO partitions whole tensors, so not exactly 1/2
    for r in results(two, f"{prefix}fsdp", 2):
        assert abs(r["param_bytes"] / ddp["param_bytes"] - 0.5) < 0.02
    both = sum(r["optim_bytes"] for r in results(two, f"{prefix}fsdp", 2))
    assert abs(both - ddp["optim_bytes"]) / ddp["optim_bytes"] < 0.02  # the shards add up to the whole


@pytest.mark.parametrize("family", list(RESUMES))
def test_fsdp_checkpoint_resumes_exactly_and_loads_in_one_process(two, tmp_path, family):
    straight_name, first_name, resumed_name = RESUMES[family]
    straight = results(two, straight_name, 2)
    first, resumed = results(two, first_name, 2), results(two, resumed_name, 2)
    assert first[0]["summary"]["status"] == "stopped" and first[0]["summary"]["steps"] == 2
    assert first[0]["losses"] + resumed[0]["losses"] == straight[0]["losses"]
    ws, wr = merged_weights(straight), merged_weights(resumed)
    for k in ws:
        assert torch.equal(ws[k], wr[k]), k
    # the final fsdp checkpoint, written by 2 ranks, evaluated in this single process
    run = Path((two / resumed_name / "run_dir.txt").read_text())
    assert latest_checkpoint(run).name == f"step_{STEPS:08d}"
    cfg = load_config(run / "config.yaml", [f"run.out_dir={tmp_path}"])
    assert cfg.model.family == family
    t = Trainer(cfg, run_dir=run, resume=True)
    assert t.engine.name == "single" and t.step == STEPS
    assert abs(t.evaluate() - resumed[0]["val"]) < 1e-5
    # and `scaletrain export` turns the sharded checkpoint into one plain file with the same model
    from scaletrain.checkpoint import load_safetensors

    r = run_cli("export", run, tmp_path / "m.safetensors")
    assert r.returncode == 0, r.stderr
    m = load_safetensors(tmp_path / "m.safetensors")
    assert type(m) is type(t.model)
    x = torch.randint(0, 257, (2, 16))
    t.model.eval()
    assert torch.equal(m(x), t.model(x))
    assert run_cli("export", run, tmp_path / "m.safetensors").returncode == 2  # never overwritten without --force


@pytest.mark.parametrize(
    "straight,first,resumed,engine",
    [
        ("zero1_torch", "zero1_first", "zero1_to_ddp", "ddp"),
        ("zero2_fairscale", "zero2fs_first", "zero2fs_to_fsdp", "fsdp"),
    ],
)
def test_a_zero_checkpoint_resumes_under_a_layout_that_does_not_shard_the_optimizer(
    two, straight, first, resumed, engine
):
    "The moments come back by name and the groups' hyper-parameters as torch's get_state_dict wrote them."
    want = results(two, straight, 2)[0]["losses"]
    a, b = results(two, first, 2)[0], results(two, resumed, 2)[0]
    assert a["summary"]["steps"] == 2 and b["engine"] == engine
    got = a["losses"] + b["losses"]
    assert len(got) == len(want) == STEPS
    # AdamW restarted fresh at step 3 would move the 4th loss by 4e-2 here (measured); resumed, it is float noise
    assert all(abs(g - w) < 1e-5 for g, w in zip(got, want)), (got, want)


@pytest.mark.parametrize("case", PRECISION, ids=[c["name"] for c in PRECISION])
def test_every_precision_runs_and_learns_under_ddp_and_fsdp(two, case):  # and zero1/zero2 for fp16, and llama
    for r in results(two, case["name"], 2):
        l = r["losses"]
        assert len(l) == 6 and all(x == x for x in l) and l[-1] < l[0] - 0.2, l
    run = Path((two / case["name"] / "run_dir.txt").read_text())
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "loss" in x]
    if "fp16-mixed" in case["name"]:
        # fairscale's ShardedGradScaler turns itself off without CUDA (scale 1); torch's start at 2**16
        first = 1.0 if "fairscale" in case["name"] and not torch.cuda.is_available() else 2.0**16
        assert steps[0]["loss_scale"] == first and all(
            x["loss_scale"] >= 1 and isinstance(x["skipped"], bool) for x in steps
        )
    else:
        assert all("loss_scale" not in x for x in steps)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "llama_fsdp"])
def test_precision_changes_the_numbers_not_the_result(two, strategy):
    "16-bit compute really happens (the losses differ from fp32's in the low digits) and stays close to fp32."
    fp32 = results(two, f"prec_{strategy}_fp32", 2)[0]["losses"]
    for p in ("bf16-mixed", "fp16-mixed", "bf16-true"):
        l = results(two, f"prec_{strategy}_{p}", 2)[0]["losses"]
        assert l != fp32 and max(abs(a - b) for a, b in zip(l, fp32)) < 0.1, (p, l, fp32)


def test_cli_fsdp_on_two_processes_as_typed(tmp_path):
    r = run_cli(
        "train", "--nproc", "2", "parallel.strategy=fsdp", "train.steps=20", f"run.out_dir={tmp_path}", timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list(tmp_path.iterdir())
    s = json.loads((run / "summary.json").read_text())
    assert (s["status"], s["world_size"], s["strategy"], s["global_batch"], s["steps"]) == (
        "finished",
        2,
        "fsdp",
        32,
        20,
    )
    assert s["final_val_loss"] < s["first_val_loss"]

"""A user's own model and own loop on every strategy (scaletrain.loop.setup): a Llama written by a user with its own
module names and a small ViT, under ddp, zero1, zero2, fsdp, activation checkpointing and bf16-mixed, and for the
decoder tensor parallelism (the user's plan) and pipeline parallelism (the user's cut points), each equal to one
process; the user's optimizer class is the one stepping, its hyper-parameters kept. One torchrun launch runs every
2-process case. Also: the refusals, and `scaletrain launch --nproc 2 examples/own_loop.py` with its resume."""

import json
import subprocess
import sys
from pathlib import Path
import pytest
import torch
from conftest import ROOT, run_cli
from scaletrain.config import ConfigError
from scaletrain.engine import clean_name
from scaletrain.procs import child_env, torchrun_args

sys.path.insert(0, str(ROOT / "tests"))
import own_model_helpers as H  # noqa: E402

DP = [  # name, overrides, gradient accumulation
    ("ddp", ["parallel.strategy=ddp"], 1),
    ("zero1", ["parallel.strategy=zero1"], 1),
    ("zero1_fairscale", ["parallel.strategy=zero1", "parallel.backend=fairscale"], 1),
    ("zero2", ["parallel.strategy=zero2"], 1),
    ("zero2_fairscale", ["parallel.strategy=zero2", "parallel.backend=fairscale"], 1),
    ("fsdp", ["parallel.strategy=fsdp"], 1),
    ("fsdp_accum", ["parallel.strategy=fsdp"], 2),
    ("ac", ["parallel.strategy=fsdp", "memory.activation_checkpointing=full"], 1),
    ("bf16", ["parallel.strategy=ddp", "memory.precision=bf16-mixed"], 1),
    ("bf16_fsdp", ["parallel.strategy=fsdp", "memory.precision=bf16-mixed"], 1),
    ("fp16_zero1", ["parallel.strategy=zero1", "memory.precision=fp16-mixed"], 1),  # loop.backward scales the loss
]
DECODER_ONLY = [
    ("tp", ["parallel.tp=2"], 1),
    ("pp_1f1b", ["parallel.pp=2", "parallel.pp_schedule=1f1b"], 1),
    ("pp_gpipe", ["parallel.pp=2", "parallel.pp_schedule=gpipe"], 1),
]
CASES = [(f"{k}_{n}", k, o, a) for k in ("llama", "vit") for n, o, a in DP] + [
    (f"llama_{n}", "llama", o, a) for n, o, a in DECODER_ONLY
]
# a scheduler built on the user's optimizer before setup: it drives the optimizer that steps (fsdp), or is refused
# where another optimizer steps (zero1's sharded one)
SCHED = [
    dict(name="llama_fsdp_sched", kind="llama", overrides=["parallel.strategy=fsdp"], sched=True),
    dict(name="llama_zero1_sched", kind="llama", overrides=["parallel.strategy=zero1"], sched=True, refused=True),
    dict(
        name="llama_zero1_sched_after",
        kind="llama",
        overrides=["parallel.strategy=zero1"],
        sched_after=True,
        refused=True,
    ),
]
# a model without repeated blocks (a plain MLP): data parallelism that needs none, and a refusal where FSDP2 would
# wrap blocks
NO_BLOCKS = [("mlp_ddp", "mlp", ["parallel.strategy=ddp"], 1), ("mlp_zero1", "mlp", ["parallel.strategy=zero1"], 1)]
CASES += NO_BLOCKS
SCHED.append(dict(name="mlp_fsdp", kind="mlp", overrides=["parallel.strategy=fsdp"], refused=True))
NAN = ("ddp", "zero1", "fsdp")  # one rank's own loss is NaN at step 1
SCHED += [  # a parameter the forward never uses: DDP's find_unused_parameters, switched by parallel.find_unused
    dict(name=f"spare_{s}", kind="llama", overrides=[f"parallel.strategy={s}", "parallel.find_unused=true"], spare=True)
    for s in ("ddp", "zero1")
]
CLAMPED = (("zero1", "torch"), ("zero1", "fairscale"), ("zero2", "fairscale"), ("fsdp", "torch"))
SCHED += [
    dict(
        name=f"clamped_{s}_{b}",
        kind="llama",
        overrides=[f"parallel.strategy={s}", f"parallel.backend={b}"],
        opt="clamped",
        refused=s != "fsdp",
    )
    for s, b in CLAMPED
]
SCHED += [dict(name=f"nan_{s}", kind="llama", overrides=[f"parallel.strategy={s}"], nan_at=1) for s in NAN]
# a user's mistakes that torch reports as a shape error deep inside a matmul or a pipeline stage: named in one line
WRONG = dict(
    llama_tp_colcol=(
        dict(tp_plan=H.LLAMA_TP | {"mlp.down": "colwise"}, overrides=["parallel.tp=2"]),
        [
            "parallel.tp: 'layers.0.mlp.down' (colwise) gets inputs 32 wide per rank but takes 64: ",
            "its input is already split",
        ],
    ),
    llama_tp_rowwise_alone=(
        dict(
            tp_plan={k: v for k, v in H.LLAMA_TP.items() if k not in ("mlp.gate", "mlp.up")},
            overrides=["parallel.tp=2"],
        ),
        [
            "parallel.tp: 'layers.0.mlp.down' (rowwise) gets inputs 64 wide per rank but takes 32: ",
            "its input is not split",
        ],
    ),
    llama_pp_first_module=(  # a cut before the first module the forward runs: the tracer drops the empty stage
        dict(pp_split=["tokens"], overrides=["parallel.pp=2"]),
        ["pp_split=['tokens']: the traced model splits into 1 stage(s), not 2: a cut at the first module"],
    ),
    llama_pp_too_few_rows=(
        dict(pp_rows=1, overrides=["parallel.pp=2"]),
        ["pp_example: 1 rows, which do not split into parallel.microbatches=4 equal micro-batches"],
    ),
    llama_pp_other_shape=(
        dict(pp_rows=4, overrides=["parallel.pp=2"]),
        [
            "pipeline_step: a batch of shape (8, 16) in parallel.microbatches=4 gives micro-batches of [(2, 16)], "
            "but the pipeline was traced on pp_example's [(1, 16)]"
        ],
    ),
)
SCHED += [dict(name=n, kind="llama", refused=True, **kw) for n, (kw, _) in WRONG.items()]
SHARDED = ("zero1", "zero1_fairscale", "zero2", "zero2_fairscale", "fsdp", "fsdp_accum", "ac", "bf16_fsdp")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("own2")
    spec = out / "spec.json"
    spec.write_text(json.dumps([dict(name=n, kind=k, overrides=o, accum=a) for n, k, o, a in CASES] + SCHED))
    cmd = torchrun_args([str(ROOT / "tests" / "own_model_worker.py"), str(spec), str(out)], nproc=2)
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return out


_REF = {}


def reference(kind, overrides):
    "One process, the whole global batch, no parallelism (the precision kept)."
    key = (kind, tuple(o for o in overrides if o.startswith("memory.precision")))
    if key not in _REF:
        _REF[key] = H.run_case(kind, list(key[1]))
    return _REF[key]


def ranks(out, name):
    return [torch.load(out / name / f"rank{r}.pt", weights_only=False) for r in range(2)]


# per strategy: (loss rtol, weight rtol, weight atol). fp32 data/sharded parallelism only reorders sums; TP and PP
# split matmuls / micro-batches; bf16/fp16-mixed round differently when the batch is split
TOL = {"fp32": (1e-5, 1e-4, 2e-5), "bf16": (2e-2, None, None)}


@pytest.mark.parametrize("name,kind,overrides,accum", CASES, ids=[c[0] for c in CASES])
def test_user_model_on_two_processes_equals_one(two, name, kind, overrides, accum):
    res, ref = ranks(two, name), reference(kind, overrides)
    half = "bf16" in name or "fp16" in name
    lt, wr, wa = TOL["bf16" if half else "fp32"]
    w = {}
    for r in res:
        assert len(r["losses"]) == H.STEPS
        for a, b in zip(r["losses"], ref["losses"]):
            assert abs(a - b) <= lt * abs(b), (name, r["losses"], ref["losses"])
        for a, b in zip(r["grad_norms"], ref["grad_norms"]):
            assert abs(a - b) <= 10 * lt * abs(b), (name, r["grad_norms"], ref["grad_norms"])
        for k, v in r["weights"].items():
            w.setdefault(clean_name(k), v)
    assert set(w) == {clean_name(k) for k in ref["weights"]} or "pp" in name, set(ref["weights"]) ^ set(w)
    if "pp" in name:  # each stage holds its part; together, the whole model
        assert set(w) == set(ref["weights"]) and not set(res[0]["weights"]) & set(res[1]["weights"])
    if half:  # 16-bit rounding moves Adam's early updates: the update itself must agree, to 10%
        init = {clean_name(k): v.float() for k, v in H.build(kind).state_dict().items()}
        off = sum(float((v - ref["weights"][k]).norm() ** 2) for k, v in w.items()) ** 0.5
        moved = sum(float((ref["weights"][k] - init[k]).norm() ** 2) for k in w) ** 0.5
        assert off < 0.1 * moved, (name, off, moved)
        return
    for k, v in w.items():
        assert torch.allclose(v, ref["weights"][k], rtol=wr, atol=wa), (name, k, (v - ref["weights"][k]).abs().max())
    assert res[0]["dp"] == (1 if ("tp" in name or "pp" in name) else 2)
    assert [r["loss_scale"] for r in res] == [2.0**16 if "fp16" in name else None] * 2  # fp16: scaled, no overflow
    strategy = next((o.split("=")[1] for o in overrides if o.startswith("parallel.strategy=")), "ddp")
    backend = "-fairscale" if "parallel.backend=fairscale" in overrides else ""
    engine = {"tp": "tp", "pp_1f1b": "pp-1f1b", "pp_gpipe": "pp-gpipe"}.get(name.split("_", 1)[1], strategy + backend)
    assert res[0]["engine"] == engine, (name, res[0]["engine"])  # zero1 is zero1, not DDP with its own AdamW


@pytest.mark.parametrize("kind", ["llama", "vit"])
@pytest.mark.parametrize("strategy", SHARDED)
def test_the_users_optimizer_class_steps_with_its_hyperparameters(two, kind, strategy):
    cls, hp = ("CountingAdamW", H.ADAMW) if kind == "llama" else ("CountingSGD", H.SGD)
    for r in ranks(two, f"{kind}_{strategy}"):
        assert (r["optimizer"], r["optimizer_module"]) == (cls, "own_model_helpers"), r["optimizer"]
        assert r["steps_taken"] == H.STEPS  # one step() per optimizer step, on this rank's local optimizer
        assert r["groups"], r["groups"]
        for g in r["groups"]:
            assert all(g[k] == v for k, v in hp.items() if k != "weight_decay"), g
            assert g["weight_decay"] in (hp["weight_decay"], 0.0)
        # the user's two groups (decay, no decay) survive sharding: a no-decay group holds the 1-D tensors
        assert {g["weight_decay"] for g in r["groups"]} <= {hp["weight_decay"], 0.0}
        # the very object the user built steps, except where a sharded optimizer wraps the user's class
        assert r["user_object"] == (strategy not in ("zero1", "zero1_fairscale", "zero2_fairscale")), strategy


def test_a_scheduler_built_before_setup_drives_the_optimizer_that_steps(two):
    ref, plain = H.run_case("llama", [], sched=True), reference("llama", [])
    assert abs(ref["losses"][-1] - plain["losses"][-1]) > 1e-4  # the schedule changes the run here
    for r in ranks(two, "llama_fsdp_sched"):
        assert r["user_object"]
        for a, b in zip(r["losses"], ref["losses"]):
            assert abs(a - b) <= TOL["fp32"][0] * abs(b), (r["losses"], ref["losses"])
    for r in ranks(two, "llama_zero1_sched"):  # refused, on every rank, in one line: it would drive nothing
        assert r["error"].startswith("optimizer: a learning-rate scheduler is attached to the CountingAdamW given")
        assert "create the scheduler after setup, on loop.optimizer" in r["error"] and "\n" not in r["error"]


@pytest.mark.parametrize("strategy", NAN)
def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(two, strategy):
    "loop.step(loss) with this rank's own loss: the skip is decided together, so the replicas stay equal."
    a, b = ranks(two, f"nan_{strategy}")
    assert a["steps_taken"] == b["steps_taken"] == H.STEPS - 1  # step 1 skipped on both
    assert a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


@pytest.mark.parametrize("strategy,backend", CLAMPED)
def test_an_optimizer_argument_outside_its_defaults_is_kept_or_refused(two, strategy, backend):
    "ZeRO rebuilds each shard's optimizer from its defaults: an argument kept elsewhere would be reset: refused."
    for r in ranks(two, f"clamped_{strategy}_{backend}"):
        if strategy == "fsdp":  # the user's object steps: nothing is rebuilt
            assert r["optimizer"] == "ClampedAdamW" and r["steps_taken"] == H.STEPS
            continue
        assert r["error"] == (
            f"optimizer: ClampedAdamW(..., max_update=0.5) keeps max_update outside its defaults, and "
            f"parallel.strategy={strategy} builds each shard's ClampedAdamW from its defaults, which would reset "
            "max_update silently; keep it in the defaults dict ClampedAdamW passes to Optimizer.__init__, or use "
            "parallel.strategy=ddp | fsdp (they step your object)"
        ), r["error"]


@pytest.mark.parametrize("strategy", ["ddp", "zero1"])
def test_parallel_find_unused_trains_a_model_with_a_parameter_its_forward_skips(two, strategy):
    a, b = ranks(two, f"spare_{strategy}")
    assert a["steps_taken"] == b["steps_taken"] == H.STEPS and a["losses"] == b["losses"]
    assert torch.equal(a["weights"]["spare.weight"], b["weights"]["spare.weight"])


def test_a_scheduler_built_after_setup_on_the_retired_optimizer_is_refused_at_the_step(two):
    for r in ranks(two, "llama_zero1_sched_after"):
        assert r["error"] == (
            "optimizer: a learning-rate scheduler was attached to the CountingAdamW given, but under zero1 the "
            "optimizer that steps is a ZeroRedundancyOptimizer that setup builds from it (loop.optimizer); create the "
            "scheduler on loop.optimizer"
        ), r["error"]


def test_sharding_really_happens(two):
    "FSDP and tensor parallelism hold part of the parameters on each rank; pipeline stages hold disjoint parts."
    for name in ("llama_fsdp", "vit_fsdp", "llama_tp", "llama_pp_1f1b"):
        whole = ranks(two, name.split("_")[0] + "_ddp")[0]["param_bytes"]  # DDP: every rank holds everything
        held = [r["param_bytes"] for r in ranks(two, name)]
        assert all(h < 0.8 * whole for h in held), (name, held, whole)
        if name.endswith("fsdp"):
            assert abs(sum(held) - whole) / whole < 0.02  # the shards add up to the model


@pytest.mark.parametrize("kind", ["llama", "vit"])
def test_activation_checkpointing_recomputes_every_block(two, kind):
    "Each block's forward starts twice per step under full checkpointing (FSDP2 around it), once without."
    plain, ac = ranks(two, f"{kind}_fsdp"), ranks(two, f"{kind}_ac")
    for p, a in zip(plain, ac):
        assert p["block_calls"] == H.STEPS * p["n_blocks"]
        assert a["block_calls"] == 2 * H.STEPS * a["n_blocks"]


def test_a_model_without_blocks_trains_where_none_are_needed(two):
    "One process equals a plain PyTorch loop; ddp and zero1 equal one process (above); FSDP2 and AC are refused."
    from scaletrain.config import load_config
    from scaletrain.models.generic import GenericSpec
    from scaletrain.parallel import check

    model = H.build("mlp")
    opt = H.user_optimizer("mlp", model)
    plain = []
    for x, y in H.global_batches("mlp"):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        plain.append(loss.item())
    one = reference("mlp", [])
    assert one["n_blocks"] == 0 and one["engine"] == "single", one["engine"]
    assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(one["losses"], plain)), (one["losses"], plain)
    for k, v in model.state_dict().items():
        assert torch.allclose(one["weights"][k], v, rtol=1e-6, atol=1e-7), k
    for r in ranks(two, "mlp_fsdp"):
        assert r["error"].startswith("parallel.strategy=fsdp works block by block, but the Sequential has no nn.Module")
        assert "pass block_cls=" in r["error"] and "\n" not in r["error"]
    m, spec = H.build("mlp"), GenericSpec(H.build("mlp"))
    for ov, said in [
        (["memory.activation_checkpointing=full"], "memory.activation_checkpointing=full works block by block"),
        (["train.compile=true"], "train.compile=true with train.compile_scope=block works block by block"),
    ]:
        assert one_line(lambda: check(load_config(overrides=ov), 1, m, spec)).startswith(said)
    check(load_config(overrides=["train.compile=true", "train.compile_scope=model"]), 2, m, spec)  # one graph: fine


@pytest.mark.parametrize("name", list(WRONG))
def test_a_plan_or_example_that_does_not_fit_is_named_not_a_shape_error(two, name):
    for r in ranks(two, name):
        assert "\n" not in r["error"] and all(w in r["error"] for w in WRONG[name][1]), r["error"]


def one_line(fn) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_refusals_say_what_to_pass():
    "tp/pp for a generic model without a plan, and a block class the model lacks: one line each, before wrapping."
    from scaletrain.config import load_config
    from scaletrain.loop import setup
    from scaletrain.models.generic import GenericSpec
    from scaletrain.parallel import check

    m = H.build("llama")
    spec = GenericSpec(m)
    assert spec.describe() == "4 blocks of DecoderLayer (auto-detected: the ModuleList 'layers')"
    # the checks every rank runs in build_engine, for a 2-process layout (no process group needed)
    tp = one_line(lambda: check(load_config(overrides=["parallel.tp=2"]), 2, m, spec))
    assert tp.startswith("parallel.tp > 1 for a model passed in Python needs its plan: setup(..., tp_plan={"), tp
    pp = one_line(lambda: check(load_config(overrides=["parallel.pp=2", "model.tie_weights=false"]), 2, m, spec))
    assert "needs its stage cut points and an example batch" in pp and "pp_split=['layers.2']" in pp, pp
    assert one_line(lambda: GenericSpec(m, pp_split="layers.2")) == (
        "pp_split='layers.2': expected a list of module paths where stages begin, e.g. ['layers.2']"
    )
    cut = GenericSpec(m, pp_split=["layers.1", "layers.3"], pp_example=torch.zeros(8, 16, dtype=torch.long))
    assert "2 pipeline stages need 1 cut points, got 2" in one_line(
        lambda: check(load_config(overrides=["parallel.pp=2", "model.tie_weights=false"]), 2, m, cut)
    )
    # a tied parameter would be copied into each pipeline stage and silently untied: refused
    tied = H.build("llama")
    tied.lm.weight = tied.tokens.weight
    said = one_line(
        lambda: check(
            load_config(overrides=["parallel.pp=2", "model.tie_weights=false"]),
            2,
            tied,
            GenericSpec(tied, pp_split=["layers.2"], pp_example=torch.zeros(8, 16, dtype=torch.long)),
        )
    )
    assert "whose 'tokens.weight' and 'lm.weight' are one tied parameter" in said and "without pp" in said, said
    # FSDP shards each block as its own unit: a tie across units, or one block placed twice, is named (a tie
    # outside the blocks, as here between the embedding and the head, shards as one unit)
    fsdp = load_config(overrides=["parallel.strategy=fsdp"])
    check(fsdp, 2, tied, GenericSpec(tied))
    across = H.build("llama")
    across.extra = torch.nn.Linear(1, 1)
    across.extra.weight = across.layers[1].attn.wq.weight
    said = one_line(lambda: check(fsdp, 2, across, GenericSpec(across)))
    assert said == (
        "parallel.strategy=fsdp: 'layers.1.attn.wq.weight' and 'extra.weight' are one tied parameter in two FSDP units "
        "(layers.1; the rest of the model), which cannot be sharded apart; untie them, or use parallel.strategy=ddp | "
        "zero1"
    ), said
    albert = H.build("llama")
    albert.layers[1] = albert.layers[0]
    said = one_line(lambda: check(load_config(overrides=["parallel.strategy=zero2"]), 2, albert, GenericSpec(albert)))
    assert said.startswith("parallel.strategy=zero2: 'layers.0' and 'layers.1' are one block module placed twice"), said
    # with the plan, the same checks pass
    check(load_config(overrides=["parallel.tp=2"]), 2, m, GenericSpec(m, tp_plan=H.LLAMA_TP))
    bad = one_line(
        lambda: check(load_config(overrides=["parallel.tp=2"]), 2, m, GenericSpec(m, tp_plan={"attn.q": "colwise"}))
    )
    assert "names 'attn.q', which block 0 does not have" in bad, bad
    cols = {k: v for k, v in H.LLAMA_TP.items() if v == "colwise"}
    bad = one_line(lambda: check(load_config(overrides=["parallel.tp=2"]), 2, m, GenericSpec(m, tp_plan=cols)))
    assert "column-wise but joins nothing row-wise, so their outputs would stay split" in bad, bad
    # nn.MultiheadAttention reads out_proj.weight itself: a split weight would meet plain tensors in its forward
    vit = H.build("vit")
    for b in vit.encoder:
        b.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    mha = GenericSpec(vit, tp_plan={"attn.out_proj": "rowwise", "fc1": "colwise", "fc2": "rowwise"})
    bad = one_line(lambda: check(load_config(overrides=["parallel.tp=2"]), 2, vit, mha))
    assert "'attn.out_proj' of block 0, inside an nn.MultiheadAttention, which uses its weights directly" in bad, bad
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert one_line(lambda: setup(m, H.user_optimizer("llama", m), block_cls="TransformerBlock", verbose=False)) == (
        "block_cls=TransformerBlock: the MyLlama has no TransformerBlock module; its repeated blocks are DecoderLayer "
        "(auto-detected: the ModuleList 'layers')"
    )
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # nothing touched


def test_every_k_checkpointing_counts_the_users_blocks_and_setup_names_wrong_arguments():
    """`memory.ac_every` is checked against the blocks the model has, not the config's `model.n_layer` (4 by default,
    a section a model passed in Python does not read): k=6 on an 8-block model checkpoints block 5; k=4 on a
    2-block one is refused with the model's count. A model or overrides of the wrong type are named in one line."""
    from scaletrain.loop import setup

    torch.manual_seed(0)
    m = H.MyLlama(n_layer=8)
    ov = ["memory.activation_checkpointing=every_k", "memory.ac_every=6"]
    loop = setup(m, H.user_optimizer("llama", m), overrides=ov, verbose=False)
    wrapped = [i for i, b in enumerate(loop.module.layers) if type(b).__name__ != "DecoderLayer"]
    assert wrapped == [5], wrapped
    small = H.MyLlama(n_layer=2)
    said = one_line(
        lambda: setup(small, H.user_optimizer("llama", small), overrides=[ov[0], "memory.ac_every=4"], verbose=False)
    )
    assert "memory.ac_every=4 with activation_checkpointing=every_k checkpoints none of model.n_layer=2" in said
    assert one_line(lambda: setup("model", None)) == "setup: model is a str; pass the torch.nn.Module to train"
    said = one_line(lambda: setup(small, H.user_optimizer("llama", small), overrides="parallel.strategy=ddp"))
    assert said.startswith("setup: overrides='parallel.strategy=ddp': expected a list of 'key=value' strings"), said


def _launch(*args):
    r = run_cli("launch", *args, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _losses(run: Path) -> list:
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


def test_own_loop_example_trains_with_fsdp_saves_and_resumes(tmp_path):
    "`scaletrain launch --nproc 2 examples/own_loop.py`: FSDP, the user's optimizer, a sharded checkpoint, a resume."
    script = "examples/own_loop.py"
    _launch("--nproc", "2", "--out-dir", tmp_path, "--name", "first", script, "--steps", "4", "--stop-after", "2")
    first = tmp_path / "first"
    assert [r["step"] for r in _losses(first)] == [1, 2]
    ck = first / "checkpoints" / "step_00000002"
    assert (ck / ".metadata").is_file() and len(list(ck.glob("*.distcp"))) == 2  # one shard file per rank
    r = _launch("--resume", first)
    assert "resumed from step 2" in r.stdout
    _launch("--nproc", "2", "--out-dir", tmp_path, "--name", "straight", script, "--steps", "4")
    resumed, straight = _losses(first), _losses(tmp_path / "straight")
    assert [x["step"] for x in resumed] == [1, 2, 3, 4]
    assert [x["loss"] for x in resumed] == [x["loss"] for x in straight]  # exactly: weights and AdamW state restored
    assert straight[-1]["loss"] < straight[0]["loss"]
    assert all(x["optimizer"] == "MyAdamW" and x["betas"] == [0.9, 0.98] and x["max_update"] == 0.01 for x in resumed)
    assert "fsdp dp=2 on 2 processes" in (first / "logs" / "rank0.log").read_text()


def test_a_fused_optimizer_over_sharded_and_plain_parameters_is_rebuilt_per_kind():
    """Tensor parallelism shards the blocks, not the embeddings, so one of the user's groups can hold DTensors and
    plain tensors at once, which a fused optimizer's kernel refuses ("got mixed torch.Tensor and DTensor"). Its
    recipe builds a fresh optimizer whose groups each hold one kind, hyper-parameters kept, that steps like an
    unfused AdamW on one process; an unfused optimizer is the user's own object, re-pointed."""
    import copy
    import torch.distributed as dist
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from scaletrain.engine import OptimizerRecipe

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.up = nn.Linear(8, 16)
            self.down = nn.Linear(16, 8)

        def forward(self, x):
            return self.down(torch.relu(self.up(self.emb(x)))).pow(2).mean()

    torch.manual_seed(0)
    ref = Net()
    x = torch.tensor([[1, 2, 3, 4]])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        built = {}
        for fused in (True, False):
            m = copy.deepcopy(ref)
            mine = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), fused=fused)
            recipe = OptimizerRecipe.of(mine, m)
            parallelize_module(m, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
            opt = recipe.build(m)
            built[fused] = (m, opt, mine)
        m, opt, mine = built[True]
        assert opt is not mine and len(opt.param_groups) == 2
        for g in opt.param_groups:
            assert len({isinstance(p, DTensor) for p in g["params"]}) == 1  # one kind per group
            assert (g["lr"], g["weight_decay"], g["betas"], g["fused"]) == (1e-2, 0.1, (0.8, 0.9), True)
        assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
        assert built[False][1] is built[False][2]  # nothing mixed to keep apart: the user's own object steps
        plain = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9))
        for _ in range(3):
            for model, o in ((ref, plain), (m, opt), built[False][:2]):
                o.zero_grad()
                model(x).backward()
                o.step()
        want = dict(ref.named_parameters())
        for model, _, _ in built.values():
            for n, p in model.named_parameters():
                got = p.full_tensor() if isinstance(p, DTensor) else p
                torch.testing.assert_close(got, want[n], rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


PP_TWO_INPUTS = '''
import sys, torch, torch.nn as nn, torch.nn.functional as F
from scaletrain.loop import setup


class Gated(nn.Module):  # forward(x, gate): a model of two inputs
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))

    def forward(self, x, gate):
        h = self.emb(x) * gate.unsqueeze(-1)
        for b in self.blocks:
            h = b(h)
        return {"logits": self.head(h)}  # a dict, as many models return


torch.manual_seed(0)
m = Gated()
x, y = torch.randint(0, 16, (8, 6)), torch.randint(0, 16, (8, 6))
gate = torch.linspace(0.5, 1.0, 6).expand(8, 6).contiguous()
loss = lambda out, t: F.cross_entropy(out["logits"].flatten(0, 1), t.flatten())
pp = sys.argv[1] == "pp"
kw = dict(pp_split=["blocks.1"], pp_example=(x, gate), loss_fn=loss) if pp else {}
ov = ["train.device=cpu"] + (["parallel.pp=2"] * pp)
loop = setup(m, torch.optim.SGD(m.parameters(), lr=0.1), overrides=ov, verbose=False, **kw)
for _ in range(2):
    l = loop.pipeline_step((x, gate), y) if pp else loss(loop.model(x, gate), y)
    if not pp:
        loop.backward(l)
    loop.step()
    loop.print(f"loss {float(l.detach()):.8f}")
'''


def test_a_pipeline_over_a_model_of_several_inputs_takes_them_as_a_tuple(tmp_path):
    """pp_example=(x, gate) traces forward(x, gate); pipeline_step((x, gate), y) then trains it as one process does,
    and the loss function gets the model's own output (a dict), not the traced graph's bare tensor."""
    script = tmp_path / "two_inputs.py"
    script.write_text(PP_TWO_INPUTS)
    one = subprocess.run([sys.executable, str(script), "one"], env=child_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = torchrun_args([str(script), "pp"], nproc=2)
    two = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    said = lambda r: [float(l.split()[1]) for l in r.stdout.splitlines() if l.startswith("loss ")]
    assert len(said(one)) == 2 and said(two) == pytest.approx(said(one), rel=1e-5), (said(one), said(two))


def test_blocks_in_several_lists_are_all_found():
    "Blocks kept in nested lists (stages of layers): every one is a block, so AC and FSDP reach them all."
    from scaletrain.models.generic import GenericSpec

    class Block(torch.nn.Linear):
        pass

    class Staged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = torch.nn.ModuleList(torch.nn.ModuleList(Block(4, 4) for _ in range(2)) for _ in range(2))
            self.head = torch.nn.Linear(4, 4)

    m = Staged()
    spec = GenericSpec(m)
    assert spec.describe() == "4 blocks of Block (auto-detected: every Block, in 'stages.0', 'stages.1')"
    assert [id(b) for b in spec.block_modules(m).values()] == [id(b) for st in m.stages for b in st]
    one = GenericSpec(torch.nn.Sequential(torch.nn.ModuleList(Block(4, 4) for _ in range(3))))
    assert one.describe() == "3 blocks of Block (auto-detected: the ModuleList '0')"


def test_loop_save_to_a_file_or_an_unwritable_place_is_one_line_and_writes_nothing(tmp_path):
    from scaletrain.loop import setup

    m = H.build("llama")
    loop = setup(m, H.user_optimizer("llama", m), overrides=["train.device=cpu"], verbose=False)
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert one_line(lambda: loop.save(f, 1)) == f"loop.save: folder={f}: is a file, not a folder; give a folder path"
    assert one_line(lambda: loop.save(f / "sub", 1)).startswith(f"loop.save: folder={f / 'sub'}: {f} is a file")
    assert f.read_text() == "mine" and sorted(tmp_path.iterdir()) == [f]


def test_a_batch_that_does_not_split_evenly_over_the_ranks_is_refused(monkeypatch):
    "7 rows on 2 ranks would weigh the ranks' rows unequally (1 row on 2: a NaN): one line, before any forward."
    from scaletrain.loop import Loop, setup

    m = H.build("llama")
    loop = setup(m, H.user_optimizer("llama", m), overrides=["train.device=cpu"], verbose=False)
    monkeypatch.setattr(Loop, "dp_size", property(lambda self: 2))
    monkeypatch.setattr(Loop, "dp_rank", property(lambda self: 1))
    x = torch.zeros(7, 16, dtype=torch.long)
    assert one_line(lambda: loop.shard((x, x))) == (
        "loop.shard: a batch of 7 rows does not split evenly over 2 data-parallel ranks; give a multiple of 2 "
        "(a DataLoader with drop_last=True and batch_size a multiple)"
    )
    part = loop.shard({"input_ids": torch.arange(8)[:, None], "scale": torch.tensor(2.0)})
    assert part["input_ids"].flatten().tolist() == [4, 5, 6, 7] and float(part["scale"]) == 2.0


def test_a_checkpoint_of_another_optimizer_class_is_named_as_such(tmp_path):
    "AdamW's state into SGD with momentum: both kinds of state named, not one missing tensor of 'this model'."
    import torch.nn.functional as F
    from scaletrain.errors import CheckpointError
    from scaletrain.loop import setup

    def trained(opt_of):
        torch.manual_seed(0)
        m = H.build("llama")
        loop = setup(m, opt_of(m.parameters()), overrides=["train.device=cpu"], verbose=False)
        b = H.global_batches("llama", 1)[0]
        loop.backward(F.cross_entropy(loop.model(b["input_ids"]).flatten(0, 1), b["labels"].flatten()))
        loop.step()
        return loop

    trained(lambda ps: torch.optim.AdamW(ps, lr=1e-3)).save(tmp_path, 1)
    sgd = trained(lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9))
    with pytest.raises(CheckpointError) as e:
        sgd.load(tmp_path)
    assert str(e.value) == (
        f"checkpoint {tmp_path / 'checkpoints' / 'step_00000001'}: its optimizer state per parameter is "
        "['exp_avg', 'exp_avg_sq', 'step'], this optimizer's is ['momentum_buffer']: it was saved by another "
        "optimizer class (or other settings, such as SGD's momentum); load it with the optimizer it was saved with"
    )
    trained(lambda ps: torch.optim.AdamW(ps, lr=1e-3)).load(tmp_path)  # the same class loads


def test_a_column_wise_fused_projection_in_the_users_plan_is_warned_about():
    "A Linear 3x as wide as its input, split by columns: a chunk(3) after it would mix q, k and v without an error."
    from scaletrain.config import load_config
    from scaletrain.models.generic import GenericSpec
    from scaletrain.parallel import check

    class Attn(torch.nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Attn() for _ in range(2))

    m = Net()
    tp = load_config(overrides=["parallel.tp=2"])
    with pytest.warns(UserWarning, match="'qkv' is column-wise and 48 wide for 16 inputs: if it is a fused q/k/v"):
        check(tp, 2, m, GenericSpec(m, tp_plan={"qkv": "colwise", "o": "rowwise"}))
    import warnings

    mlp = Net()
    for b in mlp.blocks:  # an MLP's up-projection, 40 wide: no warning
        del b.qkv
        b.up, b.o = torch.nn.Linear(16, 40), torch.nn.Linear(40, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(tp, 2, mlp, GenericSpec(mlp, tp_plan={"up": "colwise", "o": "rowwise"}))

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
SHARDED = ("zero1", "zero1_fairscale", "zero2", "zero2_fairscale", "fsdp", "fsdp_accum", "ac", "bf16_fsdp")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("own2")
    spec = out / "spec.json"
    spec.write_text(json.dumps([dict(name=n, kind=k, overrides=o, accum=a) for n, k, o, a in CASES]))
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
    cut = GenericSpec(m, pp_split=["layers.1", "layers.3"], pp_example=torch.zeros(8, 16, dtype=torch.long))
    assert "2 pipeline stages need 1 cut points, got 2" in one_line(
        lambda: check(load_config(overrides=["parallel.pp=2", "model.tie_weights=false"]), 2, m, cut)
    )
    # with the plan, the same checks pass
    check(load_config(overrides=["parallel.tp=2"]), 2, m, GenericSpec(m, tp_plan=H.LLAMA_TP))
    bad = one_line(
        lambda: check(load_config(overrides=["parallel.tp=2"]), 2, m, GenericSpec(m, tp_plan={"attn.q": "colwise"}))
    )
    assert "names 'attn.q', which block 0 does not have" in bad, bad
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert one_line(lambda: setup(m, H.user_optimizer("llama", m), block_cls="TransformerBlock", verbose=False)) == (
        "block_cls=TransformerBlock: the MyLlama has no TransformerBlock module; its repeated blocks are DecoderLayer "
        "(auto-detected: the ModuleList 'layers')"
    )
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # nothing touched


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

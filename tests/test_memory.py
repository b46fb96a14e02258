"The memory estimator against the bytes ranks really hold; train.micro_batch=auto; recovery from out-of-memory errors."

import json
import pytest
import torch
from conftest import tiny, torchrun_rows
from scaletrain import memory
from scaletrain.config import Config, ConfigError, ModelConfig, load_config
from scaletrain.engine import Engine
from scaletrain.loop import Loop
from scaletrain.memory import estimate, model_state_bytes, measure_step
from scaletrain.metrics import read_metrics
from scaletrain.models.gpt import GPT
from scaletrain.models.spec import build_model, get_spec
from scaletrain.train import Trainer

# ---- estimator vs reality ----

FAMILY_SHAPES = {"gpt": dict(family="gpt", bias=True), "llama": dict(family="llama", n_kv_head=2)}  # llama: GQA


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-true"])
def test_single_process_state_bytes_equal_the_estimate(family, precision):
    cfg = Config()
    cfg.model = ModelConfig(
        n_layer=3, n_head=4, n_embd=48, block_size=32, vocab_size=300, tie_weights=False, **FAMILY_SHAPES[family]
    )
    cfg.memory.precision = precision
    torch.manual_seed(0)
    m = build_model(cfg.model)
    if precision == "bf16-true":
        m = m.to(torch.bfloat16)
    eng = Engine(m, cfg, torch.device("cpu"))
    x, y = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    Loop.of(eng).train_step([(x, y)], 1e-3)
    eng.forward_loss(x, y).backward()
    held = model_state_bytes(eng.module, eng.optimizer)
    est = estimate(cfg, precision=precision, micro_batch=2, device="cpu")
    assert held == dict(params=est.params, grads=est.grads, optimizer=est.optimizer)


def test_each_rank_holds_what_the_estimate_says():
    """2 ranks (gloo), one launch: ddp, zero1, zero2, fsdp, tp, pp and the fairscale backends, for a gpt and for a
    llama with grouped-query attention; each rank within 5 % per component."""
    rows = torchrun_rows("memory_rank_worker.py", timeout=900)
    assert len(rows) == 20 and {r["family"] for r in rows} == {"gpt", "llama"}
    for row in rows:
        for rank in row["ranks"]:
            for k in ("params", "grads", "optimizer"):
                assert abs(rank[k] / row["estimate"][k] - 1) <= 0.05, (
                    row["family"],
                    row["layout"],
                    row["precision"],
                    k,
                    rank[k],
                    row["estimate"][k],
                )
    for fam in ("gpt", "llama"):
        held = {json.dumps(r["layout"]): r["ranks"][0] for r in rows if r["precision"] == "fp32" and r["family"] == fam}
        full = held['{"strategy": "ddp", "precisions": ["fp32", "bf16-mixed"]}']
        assert held['{"strategy": "fsdp", "precisions": ["fp32", "bf16-true"]}']["params"] < 0.55 * full["params"]
        assert held['{"strategy": "ddp", "tp": 2}']["params"] < 0.8 * full["params"]  # tp shards the blocks


@pytest.mark.parametrize("world,n_rows", [(4, 14), (8, 6)], ids=["4_ranks", "8_ranks"])
def test_each_rank_of_a_3d_layout_holds_what_the_estimate_says(world, n_rows):
    """4 ranks: tp x pp, fsdp x pp, zero2 x pp, hsdp 2 x 2, fsdp x cp and zero2 x tp; 8 ranks: fsdp x tp x pp,
    hsdp x tp and fsdp x tp x cp; gpt and llama.
    Every rank (first and last pipeline stage, every shard) within 5 % of the estimate per component."""
    rows = torchrun_rows("memory_rank_worker.py", nproc=world, timeout=900)
    assert len(rows) == n_rows and {r["family"] for r in rows} == {"gpt", "llama"}
    for row in rows:
        assert len(row["ranks"]) == world
        for rank in row["ranks"]:
            for k in ("params", "grads", "optimizer"):
                assert abs(rank[k] / row["estimate"][k] - 1) <= 0.05, (row["layout"], row["precision"], k, rank, row)
    if world == 4:  # hsdp 2 x 2: each shard group of 2 ranks holds the whole model once (sharded over 2, not 4)
        from scaletrain.models.spec import build_model

        shapes = dict(gpt=dict(bias=True), llama=dict(n_kv_head=2))
        for row in [r for r in rows if r["layout"] == {"strategy": "hsdp", "dp_shard": 2}]:
            c = ModelConfig(family=row["family"], n_layer=4, n_head=4, n_embd=64, block_size=32, vocab_size=257)
            for k, v in shapes[row["family"]].items():
                setattr(c, k, v)
            whole = 4 * sum(p.numel() for p in build_model(c).parameters())
            groups = [sum(r["params"] for r in row["ranks"][i : i + 2]) for i in (0, 2)]
            assert groups == [whole, whole], (row["family"], groups, whole)


def test_zero_paper_figure_1():
    "Rajbhandari et al. 2019, Figure 1: 7.5B parameters, N_d = 64, K = 12, in the default accounting."
    est = {
        s: estimate(params=7.5e9, precision="bf16-master", strategy=s, dp=64) for s in ("ddp", "zero1", "zero2", "fsdp")
    }
    gb = {s: round(e.model_states / 1e9, 1) for s, e in est.items()}
    assert gb == {"ddp": 120.0, "zero1": 31.4, "zero2": 16.6, "fsdp": 1.9}
    # the names mean the stages: zero1 shards only the optimizer state, zero2 also gradients, fsdp also parameters
    z1, z2, z3 = est["zero1"], est["zero2"], est["fsdp"]
    assert z1.params == est["ddp"].params and z1.grads == est["ddp"].grads and z1.optimizer < est["ddp"].optimizer
    assert z2.params == z1.params and z2.grads < z1.grads and z3.params < z2.params
    assert not any(e.notes for e in est.values())


def test_backends_say_where_they_keep_more_than_their_stage():
    n = dict(params=7.5e9, precision="bf16-mixed", dp=64)
    fair = estimate(**n, strategy="zero2", backend="fairscale")
    assert (
        fair.bucket_grads > 0
        and "reduce buckets" in fair.notes[0]
        and f"{fair.bucket_grads / 2**30:.2f}" in fair.notes[0]
    )
    fsdp2 = estimate(**n, strategy="zero2")
    assert fsdp2.params < estimate(**n, strategy="zero1").params  # FSDP2 shards parameters at rest
    assert "without resharding" in fsdp2.notes[0] and fsdp2.gathered > estimate(**n, strategy="fsdp").gathered
    assert "fp32 master" in estimate(**n, strategy="zero1").notes[0]
    # hsdp shards over its shard group only; context parallel splits activations and the shard
    h = estimate(**n, strategy="hsdp", dp_shard=8)
    assert h.params == estimate(params=7.5e9, precision="bf16-mixed", dp=8, strategy="fsdp").params
    one, two = (estimate(params=1e9, strategy="fsdp", dp=4, cp=c, micro_batch=2) for c in (1, 2))
    # half the tokens' activations, plus every layer's gathered keys and values of the whole sequence
    assert one.activations / 2 < two.activations < 0.6 * one.activations and two.params == one.params / 2


def _saved_bytes(fn, x, autocast=False, skip_shapes=(), params=(), with_input=False) -> int:
    "Bytes of the storages autograd saves while `fn(x)` runs; `params`, tensors of `skip_shapes` (and `x`) left out."
    saved = {}
    skip = {p.untyped_storage().data_ptr() for p in params} | (
        set() if with_input else {x.untyped_storage().data_ptr()}
    )

    def pack(t):
        st = t.untyped_storage()
        if tuple(t.shape) not in skip_shapes and st.data_ptr() not in skip:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", torch.bfloat16, enabled=autocast),
    ):
        fn(x)
    return sum(saved.values())


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_what_a_block_keeps_is_the_derived_bytes(family, precision, dropout):
    """One block's activations kept for backward equal `layer_bytes_per_token` to the byte: without checkpointing as
    counted by saved-tensor hooks, under selective and full checkpointing as the storages left alive by the forward.
    With dropout on CPU, SDPA runs its math kernel ((heads, T, T) tensors) and dropout keeps its noise: counted too."""
    from scaletrain.activations import apply_activation_checkpointing
    from scaletrain.config import MemoryConfig

    c = ModelConfig(
        n_layer=1, n_head=4, n_embd=64, block_size=32, vocab_size=257, dropout=dropout, **FAMILY_SHAPES[family]
    )
    shape = get_spec(family).shape(c)
    assert shape.kv < shape.n_head or family == "gpt"
    dt = torch.bfloat16 if precision == "bf16-true" else torch.float32
    mixed = precision == "bf16-mixed"
    B, T = 3, 32
    for policy in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = build_model(c).to(dt)
        model = apply_activation_checkpointing(model, MemoryConfig(activation_checkpointing=policy))
        block = get_spec(family).block_modules(model)["0"]
        x = torch.randn(B, T, 64, dtype=dt, requires_grad=True)
        if policy == "none":
            # autocast's 16-bit weight copies are saved too; the estimator books them as temporaries
            casts = 2 * sum(p.numel() for p in block.parameters() if p.dim() == 2) if mixed else 0
            got = _saved_bytes(block, x, mixed, params=block.parameters(), with_input=True) - casts
        else:  # the checkpoint holds the block input (and selective its cached outputs) outside autograd
            tr = memory.TensorMemoryTracker().track(block, x)
            before = tr.now
            with tr, torch.autocast("cpu", torch.bfloat16, enabled=mixed):
                out = block(x)
            got = tr.now - before - out.untyped_storage().nbytes() + x.untyped_storage().nbytes()
        prec = memory.precision_bytes(precision)
        assert got == memory.layer_bytes_per_token(shape, prec, policy, micro_batch=B, device="cpu") * B * T, policy


def cpu_engine(family, precision, ac, **model):
    "The config and CPU engine of a 4-layer `family` model (T=64) in `precision` with checkpointing `ac`."
    from scaletrain.activations import apply_activation_checkpointing

    cfg = Config()
    shape = dict(n_layer=4, n_head=4, n_embd=64, block_size=64, vocab_size=257, **FAMILY_SHAPES[family])
    cfg.model = ModelConfig(**shape, **model)
    cfg.memory.precision, cfg.memory.activation_checkpointing = precision, ac
    torch.manual_seed(0)
    m = build_model(cfg.model)
    if precision == "bf16-true":
        m = m.to(torch.bfloat16)
    return cfg, Engine(apply_activation_checkpointing(m, cfg.memory), cfg, torch.device("cpu"))


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize(
    "precision,ac,accum", [("fp32", "every_k", 1), ("bf16-mixed", "selective", 2), ("bf16-true", "full", 1)]
)
def test_estimated_peak_tracks_the_measured_peak_on_cpu(family, precision, ac, accum):
    cfg, eng = cpu_engine(family, precision, ac)
    mbs = [(torch.randint(0, 257, (4, 64)), torch.randint(0, 257, (4, 64))) for _ in range(accum)]
    peak = measure_step(eng, mbs)["peak"]
    est = estimate(cfg, precision=precision, micro_batch=4, grad_accum=accum, ac=ac, device="cpu")
    assert abs(est.total / peak - 1) < 0.15, (est.total, peak)


def compiled_cpu_engine(family, precision, ac):
    "`cpu_engine`'s model and config built as a run builds it with `train.compile` (blocks and loss compiled)."
    from scaletrain.parallel import build_engine

    cfg, _ = cpu_engine(family, precision, ac)
    cfg.train.compile = True
    torch._dynamo.reset()  # each engine compiles afresh
    torch.manual_seed(0)
    return cfg, build_engine(build_model(cfg.model), cfg, torch.device("cpu"), None)


def compiled_calls(eng, batch) -> int:
    "How many compiled graphs (blocks, loss) one training step of `eng` runs."
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        Loop.of(eng).train_step([batch], 1e-3)
    return sum(e.name == "CompiledFunction" for e in prof.events())


@pytest.mark.parametrize(
    "family,precision,ac",
    [("gpt", "bf16-mixed", "none"), ("llama", "fp32", "full"), ("llama", "bf16-true", "selective")],
)
def test_a_compiled_cpu_step_is_measured_compiled_and_estimated(family, precision, ac):
    # measure_step reads the allocator (compiled code's buffers included): a compiled step measures less than the
    # same step eager (the old dispatch-mode measure ran it eagerly: the same bytes), and the compiled estimate is
    # within issue 16's 15 % of it
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 257, (4, 64), generator=g), torch.randint(0, 257, (4, 64), generator=g))
    cfg, eng = compiled_cpu_engine(family, precision, ac)
    assert eng.compiled
    compiled = measure_step(eng, [batch])["peak"]
    eager = measure_step(cpu_engine(family, precision, ac)[1], [batch])["peak"]
    assert compiled < eager, (compiled, eager)
    est = memory.estimate_config(cfg, 1, 4, device="cpu")
    assert est.inputs["compiled"] and abs(est.total / compiled - 1) < 0.15, (est.total, compiled)


def test_measuring_memory_leaves_compiled_code_compiled():
    # a TorchDispatchMode makes dynamo skip a compiled frame, and it kept skipping it after the mode had gone: an
    # engine measured with measure_step (or a TensorMemoryTracker) on CPU trained eagerly from then on
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 257, (4, 64), generator=g), torch.randint(0, 257, (4, 64), generator=g))
    _, eng = compiled_cpu_engine("gpt", "fp32", "none")
    n = compiled_calls(eng, batch)
    assert n == 5  # 4 blocks and the loss
    measure_step(eng, [batch])
    assert compiled_calls(eng, batch) == n
    with memory.TensorMemoryTracker().track(eng.module) as tr:  # eager inside the context (it sees only eager code)
        assert compiled_calls(eng, batch) == 0
    assert tr.peak > 0 and compiled_calls(eng, batch) == n


@pytest.mark.parametrize(
    "family,precision,policy",
    [
        ("gpt", "fp32", "selective"),
        ("llama", "bf16-mixed", "none"),
        ("gpt", "bf16-true", "none"),
        ("llama", "fp32", "selective"),
    ],
)
def test_what_a_compiled_block_keeps_is_the_derived_bytes(family, precision, policy):
    # inductor's partitioner decides what a compiled block keeps; the estimator's compiled rows must match it
    from scaletrain.activations import apply_activation_checkpointing
    from scaletrain.config import MemoryConfig

    c = ModelConfig(n_layer=1, n_head=4, n_embd=64, block_size=32, vocab_size=257, **FAMILY_SHAPES[family])
    dt = torch.bfloat16 if precision == "bf16-true" else torch.float32
    torch.manual_seed(0)
    model = apply_activation_checkpointing(build_model(c).to(dt), MemoryConfig(activation_checkpointing=policy))
    block = get_spec(family).block_modules(model)["0"]
    block.compile()
    B, T = 3, 32
    x = torch.randn(B, T, 64, dtype=dt, requires_grad=True)
    weights = {tuple(p.shape) for p in block.parameters() if p.dim() == 2}  # autocast's copies: temporaries
    got = _saved_bytes(block, x, precision == "bf16-mixed", weights, block.parameters()) / (B * T)
    prec = memory.precision_bytes(precision)
    shape = get_spec(family).shape(c)
    kw = dict(micro_batch=B, device="cpu")
    derived = memory.layer_bytes_per_token(shape, prec, policy, compiled=True, **kw) - prec.residual * 64  # input
    assert got == derived, (got / 64, derived / 64)
    assert (
        derived <= memory.layer_bytes_per_token(shape, prec, policy, **kw) - prec.residual * 64
    )  # never more than eager


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_what_the_compiled_loss_keeps_is_the_derived_bytes(dtype):
    from scaletrain.engine import lm_loss
    from scaletrain.models.spec import ModelShape

    V, B, T = 300, 2, 16
    logits = torch.randn(B, T, V, dtype=dtype, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    loss = torch.compile(lm_loss)
    got = _saved_bytes(lambda z: loss(z, y), logits, skip_shapes=[()]) / (B * T)  # and a scalar
    got += logits.untyped_storage().nbytes() / (B * T)  # the logits themselves
    shape = ModelShape(n_layer=1, n_embd=64, n_head=4, vocab_size=V, seq_len=T)
    prec = memory.precision_bytes("fp32" if dtype == torch.float32 else "bf16-true")
    end = memory.end_bytes_per_token(shape, prec, False, True, device="cpu", compiled_loss=True)
    # the end of the model keeps the final norm and the head's input besides what the loss keeps
    assert got == end - memory.norm_bytes_per_token(shape, prec, "cpu") - prec.compute * 64
    if dtype == torch.bfloat16:  # 16-bit logits kept, no fp32 log-probabilities
        assert end < memory.end_bytes_per_token(shape, prec, False, True, device="cpu")


def test_compiled_runs_are_estimated_as_compiled():
    def est(*ov, device="cuda"):
        cfg = load_config(
            overrides=["model.family=gpt", "model.n_layer=4", "model.n_embd=256", "model.n_head=4"]
            + ["model.block_size=512", "model.vocab_size=50304", "memory.precision=bf16-mixed", *ov]
        )
        return memory.estimate_config(cfg, 1, 8, device=device)

    # (the chunked loss, on by default in eager runs, keeps less than the compiled loss: compare with it off)
    eager, comp = est("memory.chunked_loss=off"), est("train.compile=true")
    assert comp.inputs["compiled"] and comp.inputs["compiled_loss"] and not eager.inputs["compiled"]
    assert comp.activations < eager.activations and comp.total < eager.total
    # selective checkpointing compiles its blocks on CUDA by default (memory.selective_compile=auto), not its loss
    sel = est("memory.activation_checkpointing=selective")
    assert sel.inputs["compiled"] and not sel.inputs["compiled_loss"]
    assert not est("memory.activation_checkpointing=selective", device="cpu").inputs["compiled"]
    off = est("memory.activation_checkpointing=selective", "memory.selective_compile=off")
    assert not off.inputs["compiled"] and off.activations > sel.activations


def test_checkpointing_lowers_the_estimate_in_the_expected_order():
    kw = dict(params=1.3e9, seq_len=2048, micro_batch=8, precision="bf16-mixed")
    a = {ac: estimate(ac=ac, **kw).activations for ac in ("none", "selective", "full")}
    assert a["none"] > a["selective"] > a["full"]
    assert 1 - a["selective"] / a["none"] >= 0.35  # matmul outputs kept, element-wise recomputed


def test_estimator_refuses_nonsense():
    with pytest.raises(ConfigError, match="dp=0"):
        estimate(params=1e9, dp=0)
    with pytest.raises(ConfigError, match="strategy"):
        estimate(params=1e9, strategy="zero3")
    with pytest.raises(ConfigError, match="params"):
        estimate(params=-5)


# ---- train.micro_batch=auto and out-of-memory recovery ----


class FlakyEngine(Engine):
    """Runs out of memory (like CUDA would) in the forward of a micro-batch of more than `limit` sequences, from the
    `start`-th training forward on."""

    limit, start = 10**9, 1

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = 0

    def forward_loss(self, x, y):
        training = torch.is_grad_enabled()  # training forwards only: evaluation runs under no_grad
        self.calls += training
        if training and x.shape[0] > self.limit and self.calls >= self.start:
            super().forward_loss(x, y).backward()  # leave partial gradients behind, as a failure mid-backward would
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return super().forward_loss(x, y)


def flaky(limit, start=1):
    def build(model, cfg, device, info, mesh, **kw):
        e = FlakyEngine(model.to(device), cfg, device, info, mesh, **kw)
        e.limit, e.start = limit, start
        return e

    return build


def test_auto_micro_batch_takes_the_largest_that_fits_and_changes_nothing(tmp_path, corpus, cache_dir, monkeypatch):
    monkeypatch.setattr(memory, "AUTO_MAX_MICRO_BATCH", 16)
    ov = tiny(corpus, cache_dir, tmp_path, "train.steps=3", "train.ckpt_every=0", "train.eval_every=0")
    auto = Trainer(
        load_config(overrides=ov + ["train.micro_batch=auto"]), build_engine=flaky(limit=8), default_callbacks=False
    )
    assert auto.micro_batch == 8 and auto.global_batch == 8 and auto.auto_micro_batch_info["tried"] == [1, 2, 4, 8, 16]
    torch.manual_seed(load_config(overrides=ov).train.seed)
    fresh = GPT(auto.cfg.model)
    assert all(
        torch.equal(p, q) for p, q in zip(auto.model.parameters(), fresh.parameters())
    )  # lr-0 trials left the weights
    assert not auto.engine.optimizer.state and all(p.grad is None for p in auto.model.parameters())
    fixed = Trainer(load_config(overrides=ov + ["train.micro_batch=8"]), default_callbacks=False)
    auto.fit()
    fixed.fit()
    assert [r["loss"] for r in auto.history] == [r["loss"] for r in fixed.history] and len(auto.history) == 3
    # on CPU, with no out-of-memory errors, the cap decides
    assert Trainer(load_config(overrides=ov + ["train.micro_batch=auto"]), default_callbacks=False).micro_batch == 16


def test_auto_micro_batch_that_never_fits_is_one_line(tmp_path, corpus, cache_dir):
    with pytest.raises(ConfigError, match="even a micro-batch of 1 does not fit") as e:
        Trainer(
            load_config(overrides=tiny(corpus, cache_dir, tmp_path, "train.micro_batch=auto")),
            build_engine=flaky(limit=0),
        )
    assert "\n" not in str(e.value) and "largest part is" in str(e.value)


def test_out_of_memory_mid_run_halves_the_micro_batch_and_keeps_the_loss_curve(tmp_path, corpus, cache_dir, capsys):
    ov = tiny(
        corpus,
        cache_dir,
        tmp_path,
        "train.steps=6",
        "train.ckpt_every=3",
        "train.eval_every=0",
        "train.micro_batch=8",
        "train.eval_iters=1",
    )
    straight = Trainer(load_config(overrides=ov), default_callbacks=False)
    straight.fit()
    ref = [r["loss"] for r in straight.history]
    tr = Trainer(load_config(overrides=ov), build_engine=flaky(limit=2, start=3))
    s = tr.fit()
    assert s["status"] == "finished" and s["global_batch"] == straight.global_batch == 8
    assert (s["micro_batch"], s["grad_accum"]) == (2, 4)  # 8 -> 4 -> 2, accumulation 1 -> 2 -> 4
    recs = [r for r in read_metrics(tr.run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs if r.get("oom_recovered")] == [3]
    assert recs[2]["micro_batch"] == 2 and recs[2]["grad_accum"] == 4
    got = [r["loss"] for r in tr.history]
    assert got[:2] == ref[:2] and len(got) == 6
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)  # accumulation in smaller pieces: float rounding only
    assert "out of memory with micro-batch 8; retrying with micro-batch 4" in capsys.readouterr().out
    # a resumed run keeps the smaller micro-batch (same global batch)
    again = Trainer(load_config(tr.run_dir / "config.yaml", ["train.steps=7"]), run_dir=tr.run_dir, resume=True)
    assert (again.micro_batch, again.grad_accum, again.global_batch) == (2, 4, 8)


def test_out_of_memory_in_the_optimizer_step_is_not_swallowed(tmp_path, corpus, cache_dir):
    class BoomAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            raise torch.OutOfMemoryError("CUDA out of memory (injected in the optimizer step)")

    class StepOOM(Engine):
        def build_optimizer(self, groups):
            return BoomAdamW(groups, lr=1e-3)

    tr = Trainer(
        load_config(overrides=tiny(corpus, cache_dir, tmp_path, "train.steps=2")),
        build_engine=lambda model, cfg, device, info, mesh, **kw: StepOOM(model, cfg, device, info, mesh, **kw),
    )
    with pytest.raises(torch.OutOfMemoryError):
        tr.fit()
    assert tr.micro_batch == 4 and not tr.oom_events


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("precision,ac", [("fp32", "none"), ("bf16-mixed", "selective"), ("bf16-true", "full")])
def test_a_cpu_step_with_dropout_is_estimated_and_what_is_not_modelled_is_said(family, precision, ac):
    # dropout on CPU: SDPA's math kernel keeps (heads, T, T) tensors, dropout its noise; eager blocks are counted (the
    # whole step's peak within 5 %), while compiled blocks (inductor picks what to keep by size) are named in the notes
    from dataclasses import replace

    cfg, eng = cpu_engine(family, precision, ac, dropout=0.1)
    eng.model.train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 257, (8, 64), generator=g), torch.randint(0, 257, (8, 64), generator=g)
    peak = measure_step(eng, [(x, y)])["peak"]
    est = estimate(cfg, precision=precision, micro_batch=8, ac=ac, device="cpu")
    assert abs(est.total / peak - 1) < 0.05 and not est.notes, (est.total, peak, est.notes)
    no_dropout = estimate(replace(cfg.model, dropout=0.0), precision=precision, micro_batch=8, ac=ac, device="cpu")
    assert est.activations > no_dropout.activations  # the math kernel's tensors are counted
    shape = est.inputs["shape"]

    def notes(s, device, **kw):
        return estimate(s, micro_batch=8, precision=precision, device=device, **kw).notes

    (note,) = notes(shape, "cpu", compiled=True)
    assert note.startswith("model.dropout=0.1 on CPU with compiled blocks: attention runs SDPA's math kernel")
    assert not notes(shape, "cuda", compiled=True) and not notes(replace(shape, dropout=0.0), "cpu", compiled=True)


def test_the_launch_memory_check_sizes_evaluation_by_the_data_parallel_degree(monkeypatch):
    # the cp ranks of a data-parallel rank share its sequences: each evaluates eval_batch / dp of them, where
    # dp = world / (tp x pp x cp) as the run's ParallelDims says, so that is the micro-batch the check estimates
    from scaletrain import memory as mem
    from scaletrain.dist import ParallelDims
    from scaletrain.jobs import check_resources

    asked = []
    real = mem.estimate_config

    def spy(cfg, world_size=1, micro_batch=None, device="cuda", **kw):
        asked.append(micro_batch)
        return real(cfg, world_size, micro_batch, device, **kw)

    monkeypatch.setattr(mem, "estimate_config", spy)
    cfg = load_config(overrides=["parallel.cp=2", "train.eval_batch=8", "train.device=cpu", "model.family=llama"])
    check_resources(cfg, world_size=4)
    dp = ParallelDims.from_config(cfg, 4).dp
    assert dp == 2 and asked == [None, 8 // dp]

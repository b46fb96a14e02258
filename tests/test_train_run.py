"The main job end to end through the CLI, its run folder, determinism and exact resume."

import json
import pytest
from pathlib import Path
import torch
from conftest import run_cli, tiny
from scaletrain.config import load_config
from scaletrain.metrics import read_metrics
from scaletrain.train import Trainer, StopAfter, Callback


def losses(run):
    return [r["loss"] for r in read_metrics(Path(run) / "metrics.jsonl") if "loss" in r]


def test_cli_train_writes_run_folder(tmp_path, corpus, cache_dir):
    r = run_cli("train", *tiny(corpus, cache_dir, tmp_path, "run.name=demo"))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "demo"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "loss.png",
        "metrics.jsonl",
        "summary.json",
    ]
    s = json.loads((run / "summary.json").read_text())
    for k in (
        "final_train_loss",
        "final_val_loss",
        "steps",
        "tokens",
        "tokens_per_s",
        "wall_time_s",
        "python",
        "torch",
        "scaletrain",
        "git_commit",
        "seed",
        "config_hash",
        "world_size",
        "strategy",
        "global_batch",
    ):
        assert k in s, k
    assert s["status"] == "finished" and s["steps"] == 6 and s["tokens"] == 6 * 4 * 32 and s["global_batch"] == 4
    assert s["final_val_loss"] < s["first_val_loss"]
    recs = read_metrics(run / "metrics.jsonl")
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb"):
        assert all(k in r for r in steps), k
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 3, 6]
    # the summary's MFU is that of its own tokens/s (the per-step records have the same FLOPs per token and peak)
    assert s["mfu"] / s["tokens_per_s"] == pytest.approx(steps[-1]["mfu"] / steps[-1]["tokens_per_s"], rel=1e-4)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert "val loss" in r.stdout and "run folder" in r.stdout


def test_cli_resume_continues(tmp_path, corpus, cache_dir):
    ov = tiny(corpus, cache_dir, tmp_path, "run.name=r", "train.steps=4", "train.warmup_steps=1")
    assert run_cli("train", *ov).returncode == 0
    r = run_cli("train", "--resume", tmp_path / "r", "train.steps=7")
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and "step 4" in r.stdout
    assert [x["step"] for x in read_metrics(tmp_path / "r" / "metrics.jsonl") if "loss" in x] == list(range(1, 8))
    assert load_config(tmp_path / "r" / "config.yaml").train.steps == 7


def snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def test_resume_summary_covers_the_whole_run_and_a_finished_run_is_left_alone(tmp_path, corpus, cache_dir):
    ov = tiny(corpus, cache_dir, tmp_path, "run.name=r", "train.steps=4", "train.warmup_steps=1", "train.eval_every=2")
    assert run_cli("train", *ov).returncode == 0
    run = tmp_path / "r"
    first = json.loads((run / "summary.json").read_text())
    assert run_cli("train", "--resume", run, "train.steps=6").returncode == 0
    s = json.loads((run / "summary.json").read_text())
    # measured before the resume, still there after it (metrics.jsonl keeps 7 significant digits)
    assert s["first_val_loss"] == pytest.approx(first["first_val_loss"], rel=1e-6)
    assert s["final_val_loss"] is not None and s["final_val_loss"] != first["final_val_loss"]
    recs = [x for x in read_metrics(run / "metrics.jsonl") if "loss" in x]
    assert s["final_train_loss"] == pytest.approx(sum(x["loss"] for x in recs) / 6, rel=1e-5)  # all six steps
    assert s["last_checkpoint"].endswith("step_00000006") and s["run_dir"] == str(run)
    assert s["steps"] == 6 and s["tokens"] == 6 * 4 * 32 and 0 < s["tokens_per_s"] < float("inf")
    before = snapshot(run)
    r = run_cli("train", "--resume", run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{run} is finished at step 6 (train.steps=6): nothing to do, nothing written" in r.stdout
    assert snapshot(run) == before  # the summary too: not nulled, not re-timed


def test_same_seed_same_losses(tmp_path, corpus, cache_dir):
    ov = tiny(corpus, cache_dir, tmp_path, "train.ckpt_every=0", "model.dropout=0.1")
    a, b = Trainer(load_config(overrides=ov)), Trainer(load_config(overrides=ov))
    a.fit()
    b.fit()
    assert losses(a.run_dir) == losses(b.run_dir) and len(losses(a.run_dir)) == 6
    c = Trainer(load_config(overrides=ov + ["train.seed=7"]))
    c.fit()
    assert losses(c.run_dir) != losses(a.run_dir)


def test_stop_and_resume_is_exact(tmp_path, corpus, cache_dir):
    # dropout on, so the RNG state must be restored too
    ov = tiny(corpus, cache_dir, tmp_path, "train.steps=8", "train.ckpt_every=0", "model.dropout=0.1")
    straight = Trainer(load_config(overrides=ov))
    straight.fit()
    first = Trainer(load_config(overrides=ov), callbacks=[StopAfter(4)])
    assert first.fit()["status"] == "stopped"
    second = Trainer(load_config(first.run_dir / "config.yaml"), run_dir=first.run_dir, resume=True)
    assert second.step == 4
    summary = second.fit()
    assert summary["status"] == "finished"
    assert losses(first.run_dir) == losses(straight.run_dir)
    for k in ("final_train_loss", "first_val_loss", "final_val_loss"):  # the resumed run's summary is the whole run's
        assert summary[k] == pytest.approx(straight.summary[k], rel=1e-6), k
    for (n, p), (_, q) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(straight.engine.optimizer.state.values(), second.engine.optimizer.state.values()):
        assert torch.equal(p["exp_avg"], q["exp_avg"]) and torch.equal(p["exp_avg_sq"], q["exp_avg_sq"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus, cache_dir):
    from scaletrain.train import Callback

    class Poison(Callback):
        def after_step(self):
            if self.trainer.step == 4:  # corrupt the weights: the next loss is NaN
                with torch.no_grad():
                    self.trainer.model.wte.weight.fill_(float("nan"))

    t = Trainer(
        load_config(
            overrides=tiny(corpus, cache_dir, tmp_path, "train.steps=8", "train.ckpt_every=2", "train.eval_every=0")
        ),
        callbacks=[Poison()],
    )
    s = t.fit()  # the weights are NaN before step 4's checkpoint: it is not written, the run stops there
    assert s["status"] == "anomaly" and "step 4: the weights hold NaN" in s["anomaly"]
    assert (t.run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (t.run_dir / "checkpoints" / "step_00000004").exists()
    assert json.loads((t.run_dir / "summary.json").read_text())["status"] == "anomaly"


def test_stdlib_corpus_split_is_by_file_and_deterministic():
    from scaletrain.data import parse_sources, _split_files, stdlib_files

    src = parse_sources("stdlib")[0]
    tr, va = _split_files(src, 0.05)
    assert len(src.files) > 500 and set(tr).isdisjoint(va) and len(tr) + len(va) == len(src.files)
    assert 0.02 < len(va) / len(src.files) < 0.09
    assert _split_files(parse_sources("stdlib")[0], 0.05) == (tr, va)
    assert sum(f.stat().st_size for f in stdlib_files()) > 10e6


def test_compile_matches_eager_and_keeps_checkpoint_names(tmp_path, corpus, cache_dir):
    # train.compile compiles each block in place and the loss: same numbers as eager, same parameter names, and
    # every block one graph (a graph break would run its rest eagerly, host overhead on a GPU)
    import torch._dynamo
    from torch._dynamo.utils import counters

    ov = tiny(corpus, cache_dir, tmp_path, "train.steps=3", "train.ckpt_every=0", "train.eval_every=0")
    eager = Trainer(load_config(overrides=ov))
    eager.fit()
    torch._dynamo.reset()
    counters.clear()
    comp = Trainer(load_config(overrides=ov + ["train.compile=true"]))
    s = comp.fit()
    assert s["status"] == "finished"
    assert counters["frames"]["ok"] > 0 and not counters["graph_break"], dict(counters["graph_break"])
    a, b = losses(eager.run_dir), losses(comp.run_dir)
    assert len(a) == 3 and all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)
    assert [n for n, _ in comp.model.named_parameters()] == [n for n, _ in eager.model.named_parameters()]
    # its checkpoint loads into a plain, uncompiled model
    again = Trainer(
        load_config(comp.run_dir / "config.yaml", overrides=["train.compile=false"]), run_dir=comp.run_dir, resume=True
    )
    for (n, p), (_, q) in zip(comp.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), n


def test_whole_model_compile_is_one_graph_with_its_loss_and_matches_eager(tmp_path, corpus, cache_dir):
    # train.compile_scope=model: the model and its loss traced whole, without a graph break; eager's numbers and names
    import torch._dynamo
    from torch._dynamo.utils import counters

    ov = tiny(corpus, cache_dir, tmp_path, "train.steps=3", "train.ckpt_every=3", "train.eval_every=3")
    eager = Trainer(load_config(overrides=ov))
    eager.fit()
    torch._dynamo.reset()
    counters.clear()
    whole = Trainer(load_config(overrides=ov + ["train.compile=true", "train.compile_scope=model"]))
    assert whole.fit()["status"] == "finished"
    assert whole.engine.loss_in_model and whole.model._compiled_call_impl is not None
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # training, evaluation (no_grad)
    a, b = losses(eager.run_dir), losses(whole.run_dir)
    assert len(a) == 3 and all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)
    assert abs(whole.last_val - eager.last_val) <= 1e-4 * eager.last_val
    assert [n for n, _ in whole.model.named_parameters()] == [n for n, _ in eager.model.named_parameters()]
    again = Trainer(
        load_config(whole.run_dir / "config.yaml", overrides=["train.compile=false"]),
        run_dir=whole.run_dir,
        resume=True,
    )
    for (n, p), (_, q) in zip(whole.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), n


def test_selective_checkpointing_compiles_its_blocks_where_told(tmp_path, corpus, cache_dir, capsys):
    # memory.selective_compile=on (auto does it on CUDA with Triton): the checkpointed blocks are compiled, the loss is
    # not, the numbers are eager selective checkpointing's, and the run's first line says so
    from scaletrain.engine import lm_loss
    from scaletrain.models.spec import spec_for

    ov = tiny(corpus, cache_dir, tmp_path, "train.steps=3", "train.ckpt_every=0", "train.eval_every=0")
    ov += ["memory.activation_checkpointing=selective"]
    import torch._dynamo
    from torch._dynamo.utils import counters

    eager = Trainer(load_config(overrides=ov))  # auto on CPU: eager
    eager.fit()
    torch._dynamo.reset()
    counters.clear()
    comp = Trainer(load_config(overrides=ov + ["memory.selective_compile=on"]))
    assert comp.fit()["status"] == "finished"
    assert counters["frames"]["ok"] > 0 and not counters["graph_break"], dict(counters["graph_break"])

    def compiled(t):
        return [b._compiled_call_impl is not None for b in spec_for(t.model).block_modules(t.model).values()]

    assert compiled(comp) == [True, True] and compiled(eager) == [False, False]
    assert comp.engine.loss_fn is lm_loss  # the loss stays eager
    a, b = losses(eager.run_dir), losses(comp.run_dir)
    assert len(a) == 3 and all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)
    out = capsys.readouterr().out
    assert out.count("compiled: the selective-checkpointed blocks (memory.selective_compile=on)") == 1


def test_selective_compiles_unasked_only_families_known_to_compile():
    # memory.selective_compile=auto on CUDA: gpt and llama blocks (tested to compile); a transformers model or a user's
    # model stays eager unless selective_compile=on
    from scaletrain.models.hf import SPEC as HF
    from scaletrain.models.spec import get_spec
    from scaletrain.parallel import blocks_compiled

    cfg = load_config(overrides=["memory.activation_checkpointing=selective"])
    on = load_config(overrides=["memory.activation_checkpointing=selective", "memory.selective_compile=on"])
    for fam in ("gpt", "llama"):
        assert blocks_compiled(cfg, "cuda", get_spec(fam), triton=True)
        assert not blocks_compiled(cfg, "cuda", get_spec(fam), triton=False) and not blocks_compiled(cfg, "cpu")
    assert not blocks_compiled(cfg, "cuda", HF, triton=True) and blocks_compiled(on, "cuda", HF, triton=True)
    assert blocks_compiled(on, "cpu") and not blocks_compiled(load_config(), "cuda", triton=True)


class _DeviceReads(Callback):
    """Counts, per step, the reads of a tensor's value on the host (`.item()`, `float()`, `bool()`: aten's
    `_local_scalar_dense`, each a wait for the GPU on CUDA): from one step's start to the next's."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            n = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Count.n += func is torch.ops.aten._local_scalar_dense.default
                return func(*args, **(kwargs or {}))

        self.mode, self.count, self.reads, self.last = Count(), Count, {}, 0

    def before_fit(self):
        self.mode.__enter__()

    def before_step(self):
        self.reads[self.trainer.step] = self.count.n - self.last  # during the step before this one
        self.last = self.count.n

    def after_fit(self):
        self.mode.__exit__(None, None, None)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["memory.precision=bf16-mixed", "train.grad_accum=2", "memory.activation_checkpointing=selective"]
        + ["model.family=llama", "memory.chunked_loss=on", "memory.loss_chunk=16"],
    ],
)
def test_no_step_waits_for_the_device_between_log_reads(tmp_path, corpus, cache_dir, extra):
    # run.log_every=4: loss, grad norm and the skip decision stay on the device in between (the fused AdamW skips a
    # non-finite step through found_inf); only the reads at steps 4 and 8 wait. (fp16-mixed on CPU keeps torch's
    # per-tensor AdamW, which reads its step counters: the fused one is CUDA's under fp16)
    ov = tiny(corpus, cache_dir, tmp_path, "train.steps=8", "train.eval_every=0", "train.ckpt_every=0", *extra)
    watch = _DeviceReads()
    t = Trainer(load_config(overrides=ov + ["run.log_every=4"]), callbacks=[watch])
    t.fit()
    # reads[s]: during step s (reads[0]: before the first); the schedule always reads step 1 and the last step
    between = {s: n for s, n in watch.reads.items() if s not in (0, 1, 4)}
    assert set(between) == {2, 3, 5, 6, 7} and not any(between.values()), watch.reads
    assert watch.reads[4] > 0  # the read at step 4 is seen: the counter works


def test_reading_losses_every_n_steps_changes_nothing_but_the_log(tmp_path, corpus, cache_dir):
    # run.log_every=3: the host reads loss/grad norm every 3 steps; history, weights and checkpoints are the same
    ov = tiny(corpus, cache_dir, tmp_path, "train.steps=7", "train.ckpt_every=0", "train.eval_every=0")
    every = Trainer(load_config(overrides=ov))
    every.fit()
    lazy = Trainer(load_config(overrides=ov + ["run.log_every=3"]))
    s = lazy.fit()
    assert [r["loss"] for r in lazy.history] == [r["loss"] for r in every.history] and len(lazy.history) == 7
    assert [r["step"] for r in lazy.history] == list(range(1, 8)) and s["steps"] == 7
    assert [r["step"] for r in read_metrics(lazy.run_dir / "metrics.jsonl") if "loss" in r] == [3, 6]
    for (n, p), (_, q) in zip(every.model.named_parameters(), lazy.model.named_parameters()):
        assert torch.equal(p, q), n
    # callbacks hear of steps at the reads: StopAfter(4) learns of step 4 at the read of step 6 and stops there
    stopped = Trainer(load_config(overrides=ov + ["run.log_every=3"]), callbacks=[StopAfter(4)])
    assert stopped.fit()["status"] == "stopped" and stopped.step == 6
    assert (stopped.run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"

    # a stop request that arrives between reads (SIGTERM) is acted on at the next step in one process
    class Signal(Callback):
        def before_step(self):
            if self.trainer.step == 4:
                self.trainer.stop_requested = True

    sig = Trainer(load_config(overrides=ov + ["run.log_every=3"]), callbacks=[Signal()])
    assert sig.fit()["status"] == "stopped" and sig.step == 5


def test_nan_is_caught_at_its_step_when_reading_every_n_steps(tmp_path, corpus, cache_dir):
    from scaletrain.train import Callback

    class Poison(Callback):
        def before_step(self):
            if self.trainer.step == 4 and not self.trainer._pending:  # step 5 is launched on NaN weights
                with torch.no_grad():
                    self.trainer.model.wte.weight.fill_(float("nan"))

    t = Trainer(
        load_config(
            overrides=tiny(
                corpus,
                cache_dir,
                tmp_path,
                "train.steps=9",
                "train.ckpt_every=2",
                "train.eval_every=0",
                "run.log_every=3",
            )
        ),
        callbacks=[Poison()],
    )
    s = t.fit()
    # steps 5 and 6 ran before the read at step 6 (their updates skipped: the loss is NaN), but the weights poisoned
    # outside any update are caught before the checkpoint at step 6, which is never written
    assert s["status"] == "anomaly" and "step 6: the weights hold NaN or Inf (wte.weight)" in s["anomaly"]
    assert s["nonfinite_steps"] == 2
    assert (t.run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (t.run_dir / "checkpoints" / "step_00000006").exists()


def test_a_resume_runs_on_as_many_processes_as_wrote_the_checkpoint(tmp_path, corpus, cache_dir):
    "Not 1 by default: the same data-parallel size keeps the global batch, so the losses go on as they would have."
    ov = tiny(corpus, cache_dir, tmp_path, "run.name=r", "train.steps=2", "train.warmup_steps=1", "train.eval_batch=4")
    r = run_cli("train", "--nproc", "2", *ov)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train", "--resume", tmp_path / "r", "train.steps=3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming on 2 processes, as the checkpoint was written" in r.stdout
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert (s["world_size"], s["global_batch"], s["steps"]) == (2, 8, 3)
    r = run_cli("launch", "--resume", tmp_path / "r", "train.steps=4")  # a run `train` made has no launch.json spec
    assert r.returncode == 0 and "launched 2 processes" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    # another --nproc is the user's choice, and said: the global batch follows the data-parallel size
    r = run_cli("train", "--resume", tmp_path / "r", "--nproc", "1", "train.steps=5")
    assert r.returncode == 0 and "the checkpoint was written by 2" in r.stdout, r.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["world_size"] == 1


@pytest.mark.parametrize(
    "line, says",
    [
        ("[1, 2]", "line 2: [1, 2] is not a JSON object"),
        ("null", "line 2: null is not a JSON object"),
        ('{"step": "abc", "loss": 1.0}', "line 2: step='abc' is not a whole number"),
        ("{garbage", "line 2: not JSON"),  # not the last line: damage, not a write cut short by a crash
        (None, "cannot read (Is a directory)"),
    ],
)
def test_a_damaged_metrics_log_is_one_line_on_resume_and_left_as_it_was(tmp_path, corpus, cache_dir, line, says):
    ov = tiny(corpus, cache_dir, tmp_path, "run.name=r", "train.steps=3", "train.warmup_steps=1", "train.ckpt_every=3")
    assert run_cli("train", *ov).returncode == 0
    m = tmp_path / "r" / "metrics.jsonl"
    if line is None:
        m.unlink()
        m.mkdir()
    else:
        recs = m.read_text().splitlines()
        m.write_text("\n".join([recs[0], line, *recs[2:]]) + "\n")
    before = snapshot(tmp_path / "r")
    r = run_cli("train", "--resume", tmp_path / "r", "train.steps=5")
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert snapshot(tmp_path / "r") == before


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(tmp_path, corpus, cache_dir):
    "Ctrl-C while the ranks start leaves config.yaml (and maybe a few records): --resume starts it again."
    ov = tiny(corpus, cache_dir, tmp_path, "run.name=ref", "train.steps=3", "train.warmup_steps=1")
    assert run_cli("train", *ov).returncode == 0
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.yaml").write_text(
        (tmp_path / "ref" / "config.yaml").read_text().replace("name: ref", "name: early")
    )
    (early / "metrics.jsonl").write_text('{"step": 0, "val_loss": 9.0}\n{"step": 1, "loss": 9.0}\n')  # before the stop
    r = run_cli("train", "--resume", early)
    assert r.returncode == 0 and "stopped before its first checkpoint, so it starts at step 0" in r.stdout, r.stderr
    same = lambda d: [(x["step"], x.get("loss"), x.get("val_loss")) for x in read_metrics(d / "metrics.jsonl")]
    assert same(early) == same(tmp_path / "ref")  # the records of before the stop are gone, not mixed in
    # a run whose checkpoints exist but are all damaged is not that: refused, not silently started again
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text((early / "config.yaml").read_text())
    (bad / "checkpoints" / "step_00000003").mkdir(parents=True)
    r = run_cli("train", "--resume", bad)
    assert r.returncode == 2 and "holds no complete checkpoint" in r.stderr and not (bad / "metrics.jsonl").exists()


def test_an_unfinished_run_cannot_be_resumed_to_end_before_where_it_is(tmp_path, corpus, cache_dir):
    "train.steps below the steps already trained (run not finished): one line, exit 2, the run folder untouched."
    ov = tiny(corpus, cache_dir, tmp_path, "train.steps=8", "run.name=u")
    first = Trainer(load_config(overrides=ov), callbacks=[StopAfter(5)])
    assert first.fit()["status"] == "stopped"
    before = {p: p.read_bytes() for p in first.run_dir.rglob("*") if p.is_file()}
    r = run_cli("train", "--resume", first.run_dir, "train.steps=3")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip() == (
        f"scaletrain: error: config: train.steps=3, but {first.run_dir} has trained 5 of its 8 steps; resume "
        "with train.steps >= 5 (train.steps=5 ends it there)"
    )
    assert {p: p.read_bytes() for p in first.run_dir.rglob("*") if p.is_file()} == before
    r = run_cli("train", "--resume", first.run_dir, "train.steps=5")  # ends it where it is: allowed
    assert r.returncode == 0, r.stderr[-2000:]

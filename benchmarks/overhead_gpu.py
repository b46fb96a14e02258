"""scaletrain's Trainer on one GPU against the anchors of `gpu_anchors.py` (raw PyTorch), in the same process run.

    python benchmarks/overhead_gpu.py [--out DIR] [--only NAME,...]   # on a CUDA machine: GPT-2 small shape, 124M
    python benchmarks/overhead_gpu.py --tiny                          # anywhere (CPU): a 2-layer GPT, as a smoke check

`gpu_anchors.py` is a verbatim copy of `../shared/bench/gpu_anchors.py` (the GPU machine sees only this repository).
Variants, each timed like the anchors (5 untimed steps, then the mean of 20; bf16 autocast; AdamW fused on CUDA;
micro-batch 16 x 1024 tokens; vocabulary 50304):

- `anchor_raw_eager`, `anchor_raw_compiled`: `gpu_anchors.run_raw`, the anchors' own GPT and loop;
- `st_raw_compiled`: the same hand-written loop around scaletrain's `GPT` and `lm_loss`, whole model + loss compiled
  (isolates the model's own cost: separate q/k/v projections instead of one fused matrix);
- `st_raw_regional`: that loop with the model compiled the Trainer's way (each block in place, and the loss);
- `trainer_eager`, `trainer_compiled`: `scaletrain.train.Trainer` with its defaults (grad clipping at 1.0, per-step
  metrics.jsonl, tqdm, callbacks, loss read back every step) on the stdlib corpus, `train.compile=false|true`;
- `..._log10`: the same with `run.log_every=10` (the host reads loss and grad norm every 10 steps, so it queues
  the next steps while the GPU works);
- `trainer_compiled_noclip`: `train.grad_clip=0` (the norm is still computed, for the log);
- `trainer_compiled_model`: `train.compile_scope=model`, the whole model with its loss as one graph.

`--host-profile VARIANTS` (Trainer variants) runs 10 more steps after the timed ones under cProfile and writes the
host's top functions (by own time and by cumulative time) to OUT/host_profile_<variant>.txt: where a step's Python
goes when the GPU waits for the host.

Trainer step time is the mean interval between the starts of steps 6..25 (so its logging is inside it).
Prints one JSON line per variant (also appended to OUT/overhead_gpu.jsonl) and a table with the ratio of each
variant's tokens/s to `anchor_raw_compiled` (target for `trainer_compiled`: >= 0.98).
"""

from __future__ import annotations
import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # run from a checkout without installing
import torch
import gpu_anchors as A
from scaletrain.config import load_config
from scaletrain.engine import lm_loss
from scaletrain.parallel import compile_blocks, compiled_loss
from scaletrain.models.spec import build_model, get_spec
from scaletrain.train import Trainer, Callback


def profile_table(prof, dev) -> str:
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60)


class ProfileSteps(Callback):
    "torch.profiler over steps [start, start + n) of a Trainer run; prints the top kernels."

    def __init__(self, start, n, dev):
        self.start, self.n, self.dev, self.prof = start, n, dev, None

    def before_step(self):
        s = self.trainer.step
        if s == self.start:
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]
                + ([torch.profiler.ProfilerActivity.CUDA] if self.dev.type == "cuda" else [])
            )
            self.prof.start()
        elif s == self.start + self.n and self.prof is not None:
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
            self.prof.stop()
            print(f"profile of trainer steps {self.start + 1}..{s}:\n" + profile_table(self.prof, self.dev))
            self.prof = None


class HostProfile(Callback):
    "cProfile (Python stacks of the host) over steps [start, start + n) of a Trainer run; writes the top functions."

    def __init__(self, start, n, path: Path):
        import cProfile

        self.start, self.n, self.path, self.prof = start, n, path, cProfile.Profile()

    def before_step(self):
        if self.trainer.step == self.start:
            self.prof.enable()

    def after_step(self):
        if self.trainer.step == self.start + self.n:
            self.prof.disable()
            import io
            import pstats

            buf = io.StringIO()
            st = pstats.Stats(self.prof, stream=buf)
            buf.write(f"host profile of trainer steps {self.start + 1}..{self.start + self.n}\n")
            st.sort_stats("tottime").print_stats(30)
            st.sort_stats("cumulative").print_stats(30)
            self.path.write_text(buf.getvalue())
            print(f"wrote {self.path}")


class StepClock(Callback):
    "Wall-clock time at the start of every step, and once after the last."

    def __init__(self):
        self.t = []

    def before_step(self):
        self.t.append(time.perf_counter())

    def after_step(self):
        if self.trainer.step == self.trainer.cfg.train.steps:
            self.t.append(time.perf_counter())


def shape_overrides(shape, B):
    L, d, h, T, V = shape
    return [
        "model.family=gpt",  # the anchors' model is a GPT-2
        f"model.n_layer={L}",
        f"model.n_embd={d}",
        f"model.n_head={h}",
        f"model.block_size={T}",
        f"model.vocab_size={V}",
        "model.bias=true",
        "model.tie_weights=true",
        "model.dropout=0",
        f"train.micro_batch={B}",
        f"train.eval_batch={B}",
    ]


def run_st_raw(cfg_shape, B, dev, compile_, regional=False):
    "The anchors' loop around scaletrain's GPT and loss; `regional`: compiled as the Trainer does (each block, loss)."
    c = load_config(overrides=shape_overrides(cfg_shape, B)).model
    m = build_model(c).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4, fused=dev.type == "cuda")

    class WithLoss(torch.nn.Module):
        def __init__(s, m, loss):
            super().__init__()
            s.m, s.loss = m, loss

        def forward(s, x, y):
            return s.loss(s.m(x), y)

    if regional:  # exactly what build_engine does under train.compile
        fwd = WithLoss(compile_blocks(m, get_spec(c.family)), compiled_loss(lm_loss))
    else:
        fwd = WithLoss(m, lm_loss)
        fwd = torch.compile(fwd) if compile_ else fwd

    return m, raw_step(fwd, opt, dev)


def raw_step(fwd, opt, dev):
    "One hand-written training step: `fwd(x, y)` (the loss) under bf16 autocast, backward, optimizer step."

    def step(x, y):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_trainer(cfg_shape, B, dev, compile_, warm, n, work: Path, extra=(), profile=False, host_profile=None):
    ov = shape_overrides(cfg_shape, B) + [
        f"train.steps={warm + n}",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.eval_iters=1",
        "train.ckpt_every=0",
        f"train.device={dev.type}",
        "memory.precision=bf16-mixed",
        f"train.compile={str(compile_).lower()}",
        f"run.out_dir={work}",
        f"data.cache_dir={work / 'cache'}",
        *extra,
    ]
    clock = StepClock()
    extra_cbs = [ProfileSteps(warm + n, 3, dev)] if profile else []  # after the timed steps, so they are not disturbed
    if host_profile is not None:
        extra_cbs.append(HostProfile(warm + n + (4 if profile else 0), 10, host_profile))
    if profile or host_profile is not None:
        more = (4 if profile else 0) + (11 if host_profile is not None else 0)
        ov = [o for o in ov if not o.startswith("train.steps=")] + [f"train.steps={warm + n + more}"]
    t = Trainer(load_config(overrides=ov), callbacks=[clock, *extra_cbs])
    s = t.fit()
    d = [b - a for a, b in zip(clock.t, clock.t[1:])][warm : warm + n]
    return t, sum(d) / len(d), s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--profile", default="", help="comma-separated variants to profile for 3 steps after timing them")
    ap.add_argument("--host-profile", default="", help="comma-separated Trainer variants to cProfile for 10 steps")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    if a.tiny:
        shape, B, warm, n = (2, 64, 4, 128, 512), 4, 2, 3
    else:
        shape, B, warm, n = (12, 768, 12, 1024, 50304), 16, 5, 20
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the anchors do
    peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
    info = dict(
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        batch=B,
        seq_len=shape[3],
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="overhead_gpu_"))
    only = set(filter(None, a.only.split(",")))
    data = A.batches(B, shape[3], shape[4], dev)
    mc = load_config(overrides=shape_overrides(shape, B)).model
    fpt = get_spec(mc.family).flops_per_token(mc)
    res = []

    def emit(name, step_s, extra=None):
        tok = B * shape[3] / step_s
        r = dict(
            name=name,
            step_ms=round(step_s * 1e3, 2),
            tokens_per_s=round(tok),
            mfu=round(fpt * tok / peak, 4),
            peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None,
            **info,
            **(extra or {}),
        )
        res.append(r)
        print(json.dumps(r), flush=True)
        with open(out / "overhead_gpu.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")

    plan = [
        ("anchor_raw_eager", lambda: A.run_raw(dict(shape=shape, B=B), dev, False)),
        ("anchor_raw_compiled", lambda: A.run_raw(dict(shape=shape, B=B), dev, True)),
        ("st_raw_compiled", lambda: run_st_raw(shape, B, dev, True)),
        ("st_raw_regional", lambda: run_st_raw(shape, B, dev, True, regional=True)),
        ("trainer_eager", dict(compile_=False)),
        ("trainer_eager_log10", dict(compile_=False, extra=["run.log_every=10"])),
        ("trainer_compiled", dict(compile_=True)),
        ("trainer_compiled_log10", dict(compile_=True, extra=["run.log_every=10"])),
        ("trainer_compiled_noclip", dict(compile_=True, extra=["train.grad_clip=0"])),
        ("trainer_compiled_model", dict(compile_=True, extra=["train.compile_scope=model"])),
    ]
    for name, make in plan:
        if only and name not in only:
            continue
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            prof = name in a.profile.split(",")
            if callable(make):
                m, step = make()
                s = A.timed(step, data, dev, warm, n)
                emit(name, s, dict(setup_s=round(time.perf_counter() - t0 - s * n, 1)))
                if prof:
                    with torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CPU]
                        + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
                    ) as p:
                        A.timed(step, data, dev, 0, 3)
                    print(f"profile of {name}, 3 steps:\n" + profile_table(p, dev))
                del m, step
            else:
                hp = out / f"host_profile_{name}.txt" if name in a.host_profile.split(",") else None
                t, s, summ = run_trainer(
                    shape, B, dev, work=work / name, warm=warm, n=n, profile=prof, host_profile=hp, **make
                )
                emit(
                    name,
                    s,
                    dict(
                        trainer_mfu=round(summ["mfu"], 4),
                        n_params=summ["n_params"],
                        wall_s=round(time.perf_counter() - t0, 1),
                    ),
                )
                del t
        except Exception as e:  # one variant failing must not lose the others
            import traceback

            traceback.print_exc()
            r = dict(name=name, error=repr(e)[:300], **info)
            res.append(r)
            print(json.dumps(r), flush=True)
        gc.collect()
        torch._dynamo.reset()
    base = next((r for r in res if r["name"] == "anchor_raw_compiled" and "tokens_per_s" in r), None)
    print(f"\n{'variant':<26} {'step ms':>9} {'tokens/s':>11} {'MFU':>7} {'mem GB':>7} {'vs raw compiled':>16}")
    for r in res:
        if "tokens_per_s" not in r:
            print(f"{r['name']:<26} error: {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}x" if base else "-"
        print(
            f"{r['name']:<26} {r['step_ms']:>9.2f} {r['tokens_per_s']:>11,} {r['mfu']:>7.3f} "
            f"{str(r['peak_mem_gb']):>7} {ratio:>16}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

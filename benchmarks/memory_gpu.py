"""Predicted vs measured memory, and step time, for every activation-checkpointing policy and precision.

    python benchmarks/memory_gpu.py                 # on a CUDA machine: a ~124M-parameter GPT (GPT-2 small shape)
    python benchmarks/memory_gpu.py --family llama  # the same size as a llama (RMSNorm, SwiGLU, rotary; --kv-heads N)
    python benchmarks/memory_gpu.py --tiny          # anywhere, on CPU: a 2-layer model, as a smoke check
    python benchmarks/memory_gpu.py --out results/  # JSON lines go to results/memory_gpu.jsonl (default: $OUT, else .)

For each precision (fp32, bf16-mixed, bf16-true; fp16-mixed with --all-precisions) and each policy of
`memory.activation_checkpointing` (none, selective, full, every_k with k=2) it builds scaletrain's single-process
`Engine` around the model (`--family`, default gpt: GPT-2's layout with biases), runs warm-up steps, then measures

- the peak memory of a training step: `torch.cuda.max_memory_allocated` on CUDA; on CPU (`--tiny`) the peak of the
  tensor storages alive at once, tracked by `scaletrain.memory.TensorMemoryTracker` (the process RSS is no
  measure of a step on CPU: the allocator keeps and reuses freed pages);
- the activation memory: bytes allocated at the end of the forward pass (loss computed) minus those before it, and
  the part the transformer blocks leave behind (allocated after the last block minus before the first) -- the
  quantity Korthikanti et al. 2022 reduce; the rest is the output layer's (logits, fp32 log-softmax: 4 bytes x vocab
  per token), which block checkpointing does not touch and which, with GPT-2's 50k vocabulary, is about a third;
- the mean wall time of a step over `--steps` steps and the tokens per second,

and compares each with `scaletrain.memory.estimate_config(...)` (device "cuda", or "cpu" with --tiny). It prints one
table and writes one JSON line per configuration. At the end it checks the targets of the memory issue, per precision:

- estimate within +-15 % of the measured peak;
- selective checkpointing keeps >= 90 % of the no-checkpointing throughput and cuts activation memory >= 40 %
  (checked both for the whole forward and for the blocks alone);
- full checkpointing cuts the peak memory >= 50 %.

`--strict` makes a missed target exit with code 1. It needs only torch and this repository (no network, no data:
token ids are random). Its H200 results (2026-11-27) are in benchmarks/RESULTS.md. `--compile` measures the engine
with `train.compile` (the estimator counts what inductor's partitioner keeps there). `selective` runs as a run of
that config would: on CUDA with Triton its blocks are compiled (`memory.selective_compile=auto`); `selective-eager`
is the same policy in eager mode.
"""

from __future__ import annotations
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import torch
from scaletrain.config import Config, ModelConfig
from scaletrain.loop import Loop
from scaletrain.models.spec import build_model, get_spec
from scaletrain.parallel import build_engine
from scaletrain.memory import AllocatorMemoryTracker, estimate_config, measure_step, GiB

# "selective" runs as a run would (memory.selective_compile=auto: its blocks compiled on CUDA with Triton);
# "selective-eager" is the same policy with memory.selective_compile=off
POLICIES = ("none", "selective", "selective-eager", "full", "every_k")


def build(shape: dict, precision: str, ac: str, device: torch.device, compile_: bool = False):
    "The Trainer's one-process engine: `build_engine` applies checkpointing, then (compile_) compiles blocks and loss."
    cfg = Config()
    cfg.model = ModelConfig(**shape)
    cfg.memory.precision, cfg.memory.ac_every = precision, 2
    cfg.memory.activation_checkpointing = ac.removesuffix("-eager")
    cfg.memory.selective_compile = "off" if ac.endswith("-eager") else "auto"
    cfg.train.compile = compile_
    torch.manual_seed(0)
    return cfg, build_engine(build_model(cfg.model), cfg, device, None)


def measure(eng, batch, steps: int, warmup: int) -> dict:
    dev = eng.device
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    for _ in range(warmup):
        Loop.of(eng).train_step([batch], 1e-4)
    sync()
    # activation memory: allocated after forward + loss, minus before; and what the blocks alone leave behind. On
    # CPU the allocator's events (AllocatorMemoryTracker) count compiled code's buffers; marks record the live bytes
    tracker = None if cuda else AllocatorMemoryTracker(dev).track(eng.module, eng.optimizer, *batch)
    marks = {}
    mark = (lambda k: marks.__setitem__(k, (sync(), torch.cuda.memory_allocated(dev))[1])) if cuda else tracker.mark
    # around the blocks, on the (never compiled) modules just before and after them: the family's last embedding
    # module (its dropout) and its final norm
    m = eng.module
    spec = get_spec(eng.cfg.model.family)
    hooks = [
        getattr(m, spec.first_modules[-1]).register_forward_hook(lambda mod, a, o: mark("in")),
        getattr(m, spec.last_modules[0]).register_forward_pre_hook(lambda mod, a: mark("out")),
    ]
    try:
        if cuda:
            mark("base")
            loss = eng.forward_loss(*batch)
            mark("loss")
        else:
            with tracker:
                tracker.mark("base")
                loss = eng.forward_loss(*batch)
                tracker.mark("loss")
            marks = tracker.marks
    finally:
        for h in hooks:
            h.remove()
    act = marks["loss"] - marks["base"]
    del loss
    eng.optimizer.zero_grad(set_to_none=True)
    peak = measure_step(eng, [batch], 1e-4, warm=False)["peak"]  # of a whole step
    t0 = time.perf_counter()
    for _ in range(steps):
        Loop.of(eng).train_step([batch], 1e-4)
    sync()
    return dict(peak=peak, act=act, blocks_act=marks["out"] - marks["in"], step_time=(time.perf_counter() - t0) / steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="2-layer model on CPU (smoke check)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 8 on GPU, 4 tiny)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024 on GPU, 64 tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 2 tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on GPU, 1 tiny)")
    p.add_argument("--all-precisions", action="store_true", help="also fp16-mixed")
    p.add_argument("--precisions", default="", help="comma-separated precisions to run instead (e.g. bf16-mixed)")
    p.add_argument(
        "--compile", action="store_true", help="train.compile=true: blocks and loss compiled (as the Trainer does)"
    )
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 50304, GPT-2's padded; 512 tiny)")
    p.add_argument("--family", default="gpt", help="model family: gpt (GPT-2's layout, biases) | llama")
    p.add_argument("--kv-heads", type=int, default=0, help="llama: key/value heads (grouped-query attention; 0 = all)")
    p.add_argument("--out", default=None, help="folder for memory_gpu.jsonl (default $OUT, else the current folder)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    a = p.parse_args(argv)
    arch = dict(family="gpt", bias=True) if a.family == "gpt" else dict(family=a.family, n_kv_head=a.kv_heads)
    if a.tiny:
        dev = torch.device("cpu")
        shape = dict(n_layer=2, n_head=4, n_embd=64, block_size=a.seq_len or 64, vocab_size=a.vocab or 512, **arch)
        mb, steps, warmup = a.micro_batch or 4, a.steps or 2, a.warmup if a.warmup is not None else 1
    else:
        if not torch.cuda.is_available():
            print("memory_gpu: no CUDA device; use --tiny for the CPU smoke check", file=sys.stderr)
            return 2
        dev = torch.device("cuda", 0)
        shape = dict(
            n_layer=12, n_head=12, n_embd=768, block_size=a.seq_len or 1024, vocab_size=a.vocab or 50304, **arch
        )  # GPT-2 small, 124M (as a gpt)
        mb, steps, warmup = a.micro_batch or 8, a.steps or 10, a.warmup if a.warmup is not None else 3
    precisions = (
        a.precisions.split(",")
        if a.precisions
        else ["fp32", "bf16-mixed", "bf16-true"] + (["fp16-mixed"] if a.all_precisions else [])
    )
    out_dir = Path(a.out or os.environ.get("OUT") or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / "memory_gpu.jsonl"
    T, V = shape["block_size"], shape["vocab_size"]
    g = torch.Generator().manual_seed(0)
    batch = tuple(torch.randint(0, V, (mb, T), generator=g).to(dev) for _ in range(2))
    n_params = get_spec(a.family).shape(ModelConfig(**shape)).n_params()
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(
        f"memory_gpu: {a.family} {n_params / 1e6:.1f}M params, micro-batch {mb} x {T} tokens, on {dev_name}; "
        f"peak = {'torch.cuda.max_memory_allocated' if dev.type == 'cuda' else 'the CPU allocator (torch.profiler)'}"
    )
    unit = GiB if dev.type == "cuda" else 2**20
    uname = "GiB" if dev.type == "cuda" else "MiB"
    print(
        f"{'precision':<11} {'AC':<15} {'peak ' + uname:>10} {'est ' + uname:>10} {'err':>7} {'act ' + uname:>10} "
        f"{'est act':>9} {'blocks act':>10} {'step ms':>9} {'tok/s':>10}"
    )
    results = []
    with open(out_file, "a") as fh:
        for prec in precisions:
            for ac in POLICIES:
                if a.compile and ac == "selective-eager":
                    continue  # train.compile compiles every block whatever selective_compile says
                if a.compile:
                    torch._dynamo.reset()  # each configuration compiles afresh
                cfg, eng = build(shape, prec, ac, dev, a.compile)
                try:
                    r = measure(eng, batch, steps, warmup)
                except torch.OutOfMemoryError as e:
                    print(f"{prec:<11} {ac:<15} out of memory ({str(e).splitlines()[0][:60]})")
                    continue
                finally:
                    eng_compiled = eng.compiled
                    del eng
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                est = estimate_config(cfg, 1, mb, device=dev.type)  # the engine's own config: precision and policy
                rec = dict(
                    family=a.family,
                    device=dev_name,
                    torch=torch.__version__,
                    params=n_params,
                    micro_batch=mb,
                    seq_len=T,
                    precision=prec,
                    ac=ac,
                    compile=a.compile,
                    compiled=eng_compiled,
                    peak_bytes=r["peak"],
                    estimate_bytes=est.total,
                    error=est.total / r["peak"] - 1,
                    activation_bytes=r["act"],
                    estimate_activation_bytes=est.activations,
                    block_activation_bytes=r["blocks_act"],
                    step_time_s=r["step_time"],
                    tokens_per_s=mb * T / r["step_time"],
                    estimate_phase=est.phase,
                    estimate_parts=est.parts(),
                )
                results.append(rec)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                print(
                    f"{prec:<11} {ac:<15} {r['peak'] / unit:>10.3f} {est.total / unit:>10.3f} {rec['error']:>+7.1%} "
                    f"{r['act'] / unit:>10.3f} {est.activations / unit:>9.3f} {r['blocks_act'] / unit:>10.3f} "
                    f"{r['step_time'] * 1e3:>9.1f} {rec['tokens_per_s']:>10.0f}"
                )
    ok = True
    print("\ntargets:")
    for prec in precisions:
        got = {r["ac"]: r for r in results if r["precision"] == prec}
        if "none" not in got:
            continue
        n = got["none"]
        checks = [(f"estimate within 15% of the peak ({ac})", abs(got[ac]["error"]) <= 0.15) for ac in got]
        if "selective" in got:
            s = got["selective"]
            checks += [
                ("selective keeps >= 90% of throughput", s["tokens_per_s"] >= 0.9 * n["tokens_per_s"]),
                *(
                    [
                        (
                            "eager selective (selective_compile=off) keeps >= 90% of throughput",
                            got["selective-eager"]["tokens_per_s"] >= 0.9 * n["tokens_per_s"],
                        )
                    ]
                    if "selective-eager" in got
                    else []
                ),
                (
                    "selective cuts activation memory >= 40% (whole forward)",
                    s["activation_bytes"] <= 0.6 * n["activation_bytes"],
                ),
                (
                    "selective cuts the blocks' activation memory >= 40%",
                    s["block_activation_bytes"] <= 0.6 * n["block_activation_bytes"],
                ),
            ]
        if "full" in got:
            checks.append(("full cuts peak memory >= 50%", got["full"]["peak_bytes"] <= 0.5 * n["peak_bytes"]))
        for what, passed in checks:
            ok &= passed
            print(f"  {prec:<11} {'PASS' if passed else 'MISS'}  {what}")
    print(f"\nwrote {len(results)} records to {out_file}")
    if a.tiny:
        print("(--tiny on CPU: a smoke check of the script; the targets are meant for the GPU run)")
    return 1 if (a.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())

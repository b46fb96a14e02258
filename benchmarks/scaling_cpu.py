"""Throughput and per-rank memory of every parallel strategy at 1 and 2 processes, as one table.

    python benchmarks/scaling_cpu.py [--steps 20] [--repeat 1] [--device auto] [--json OUT.json] [key=value ...]

Each case is a real `Trainer` run in its own torchrun job (so peak RSS is per case): the 1-process baseline
(at one process every strategy is the plain `Engine`) and, at 2 processes, ddp, zero1 and zero2 (torch and
fairscale), fsdp, tp and pp (1F1B). Reported per case: tokens/s over all ranks from `summary.json` (the
first step, which pays for warm-up, excluded), and per rank the bytes of parameters, gradients and
optimizer state (`Engine.state_bytes()`, local shards only; the largest over the ranks) and the peak
resident set (`ru_maxrss`, which includes the interpreter and libraries) — plus peak CUDA memory on a GPU.

Data-parallel layouts keep the micro-batch per rank (weak scaling: 2 processes train twice the tokens per
step); tp and pp keep the global batch of one process and split the work on it. `--device auto` runs the
1-process row on a GPU when there is one, and the 2-process rows on GPUs when there are two (else on CPU).
Prints a Markdown table and writes JSON (updated after every case) next to this file unless `--json`.
"""

from __future__ import annotations
import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
# a small GPT (GPT-2's layout, biases, as the results in RESULTS.md) on the stdlib corpus; untied weights so that
# the pipeline cases train the same model. `model.family=llama` on the command line runs the default family instead.
MODEL = [
    "model.family=gpt",
    "model.bias=true",
    "model.n_layer=4",
    "model.n_embd=128",
    "model.n_head=4",
    "model.block_size=128",
    "model.tie_weights=false",
    "train.micro_batch=8",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "train.eval_iters=1",
    "train.eval_batch=16",
    "train.ckpt_every=0",
]
CASES = [  # name, processes, overrides
    ("1 process", 1, []),
    ("ddp", 2, ["parallel.strategy=ddp"]),
    ("zero1 torch", 2, ["parallel.strategy=zero1"]),
    ("zero1 fairscale", 2, ["parallel.strategy=zero1", "parallel.backend=fairscale"]),
    ("zero2 torch", 2, ["parallel.strategy=zero2"]),
    ("zero2 fairscale", 2, ["parallel.strategy=zero2", "parallel.backend=fairscale"]),
    ("fsdp", 2, ["parallel.strategy=fsdp"]),
    ("tp", 2, ["parallel.tp=2"]),
    ("pp 1f1b", 2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
]


# ---- inside each torchrun rank ----
def worker(spec_path: str, out_path: str) -> int:
    import torch
    import torch.distributed as dist
    from scaletrain.config import load_config
    from scaletrain.train import Trainer
    from scaletrain.dist import teardown

    spec = json.loads(Path(spec_path).read_text())
    t = Trainer(load_config(overrides=spec["overrides"]), default_callbacks=False)
    s = t.fit()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cuda = torch.cuda.max_memory_allocated(t.device) if t.device.type == "cuda" else None
    mine = dict(peak_rss=rss, peak_cuda=cuda)
    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if t.info.is_main:
        keep = (
            "tokens_per_s",
            "steps",
            "global_batch",
            "micro_batch",
            "seq_len",
            "world_size",
            "dp",
            "tp",
            "pp",
            "n_params",
            "device",
            "train_time_s",
            "status",
            "state_bytes_per_rank",
            "torch",
        )
        Path(out_path).write_text(json.dumps(dict({k: s[k] for k in keep}, engine=t.engine.name, ranks=ranks)))
    teardown()
    return 0


# ---- the driver ----
def run_case(name, nproc, overrides, device, work: Path, logs: Path) -> dict:
    from scaletrain.procs import torchrun_args, child_env

    case_dir = work / name.replace(" ", "_")
    case_dir.mkdir(parents=True, exist_ok=True)
    spec, out = case_dir / "spec.json", case_dir / "out.json"
    spec.write_text(
        json.dumps(dict(overrides=overrides + [f"train.device={device}", f"run.out_dir={case_dir / 'runs'}"]))
    )
    cmd = torchrun_args([str(Path(__file__).resolve()), "--worker", str(spec), str(out)], nproc=nproc)
    load0 = os.getloadavg()[0]
    with open(logs / f"{name.replace(' ', '_')}.log", "a") as log:
        r = subprocess.run(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"scaling_cpu: case '{name}' failed (exit {r.returncode}); see {logs}")
    res = json.loads(out.read_text())
    res["load_before"], res["load_after"] = load0, os.getloadavg()[0]
    shutil.rmtree(case_dir, ignore_errors=True)
    return res


def fmt_bytes(n) -> str:
    if n is None:
        return "–"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["name"] == "1 process")
    base_tps = base["tokens_per_s"]
    head = [
        "strategy",
        "procs",
        "device",
        "engine",
        "global batch",
        "tokens/s",
        "speed-up",
        "tokens/s per proc",
        "params/rank",
        "grads/rank",
        "optim/rank",
        "model states vs 1 proc",
        "peak RSS/rank",
    ]
    if any(r.get("peak_cuda") for r in rows):
        head.append("peak CUDA/rank")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_states = sum(base["state"].values())
    for r in rows:
        st = r["state"]
        cells = [
            r["name"],
            r["world_size"],
            r["device"],
            r["engine"],
            r["global_batch"],
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s'] / base_tps:.2f}×",
            f"{r['tokens_per_s'] / r['world_size']:,.0f}",
            fmt_bytes(st["params"]),
            fmt_bytes(st["grads"]),
            fmt_bytes(st["optim"]),
            f"{sum(st.values()) / base_states:.2f}",
            fmt_bytes(r["peak_rss"]),
        ]
        if "peak CUDA/rank" in head:
            cells.append(fmt_bytes(r.get("peak_cuda")))
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def summarize(name, nproc, runs: list[dict]) -> dict:
    "Median tokens/s over repeats; memory from the first run (it is deterministic); the largest over the ranks."
    r0 = runs[0]
    sb = r0["state_bytes_per_rank"]
    state = {k: max(x[k] for x in sb) for k in ("params", "grads", "optim")}
    cuda = [x["peak_cuda"] for x in r0["ranks"] if x["peak_cuda"] is not None]
    return dict(
        name=name,
        world_size=nproc,
        device=r0["device"],
        engine=r0["engine"],
        global_batch=r0["global_batch"],
        seq_len=r0["seq_len"],
        n_params=r0["n_params"],
        tokens_per_s=statistics.median(x["tokens_per_s"] for x in runs),
        tokens_per_s_runs=[x["tokens_per_s"] for x in runs],
        state=state,
        state_bytes_per_rank=sb,
        peak_rss=max(x["peak_rss"] for x in r0["ranks"]),
        peak_cuda=max(cuda) if cuda else None,
        load=[(x["load_before"], x["load_after"]) for x in runs],
        torch=r0["torch"],
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="config overrides for every case, e.g. model.n_embd=256")
    p.add_argument(
        "--steps", type=int, default=20, help="optimizer steps per case (the first is excluded from tokens/s)"
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per case; tokens/s is the median")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--only", default="", help="comma-separated case names to run (default: all)")
    p.add_argument("--json", default=str(HERE / "scaling_cpu.json"), help="where to write the results")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(*a.worker)
    import torch
    from tqdm.auto import tqdm
    from scaletrain.config import load_config, ConfigError
    from scaletrain.files import atomic_write_text
    from scaletrain.data import prepare_data

    common = MODEL + [f"train.steps={a.steps}"] + list(a.overrides)
    try:
        cfg = load_config(overrides=common)
    except ConfigError as e:
        print(f"scaling_cpu: error: {e}", file=sys.stderr)
        return 2
    prepare_data(cfg.data)  # tokenize once, before any case starts
    n_gpu = torch.cuda.device_count() if a.device != "cpu" else 0

    def device_for(nproc):
        if a.device == "cpu" or n_gpu < nproc:
            return "cpu"
        return "cuda"

    if a.device == "cuda" and n_gpu == 0:
        print("scaling_cpu: error: --device cuda but no GPU", file=sys.stderr)
        return 2
    cases = [c for c in CASES if not a.only or c[0] in a.only.split(",")]
    if a.only and not any(c[0] == "1 process" for c in cases):
        cases = [CASES[0]] + cases  # the baseline of the speed-up
    work = Path(tempfile.mkdtemp(prefix="scaling-cpu-"))
    logs = work / "logs"
    logs.mkdir()
    meta = dict(
        date=datetime.now().isoformat(timespec="seconds"),
        host=platform.node(),
        cpus=os.cpu_count(),
        gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        torch=torch.__version__,
        python=platform.python_version(),
        steps=a.steps,
        repeat=a.repeat,
        overrides=common,
        logs=str(logs),
    )
    rows = []
    print(f"scaling_cpu: {len(cases)} cases x {a.repeat}, {a.steps} steps each; logs in {logs}", flush=True)
    for name, nproc, ov in tqdm(cases, desc="cases", file=sys.stderr):
        dev = device_for(nproc)
        runs = [run_case(name, nproc, common + ov, dev, work, logs) for _ in range(a.repeat)]
        rows.append(summarize(name, nproc, runs))
        tqdm.write(f"  {name:<16} {nproc} x {dev}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
        atomic_write_text(a.json, json.dumps(dict(meta=meta, rows=rows), indent=1))  # partial results as we go
    md = table(rows)
    print(
        f"\nmodel: {rows[0]['n_params'] / 1e6:.2f}M parameters, sequence {rows[0]['seq_len']}; "
        f"torch {torch.__version__}; "
        f"{os.cpu_count()} CPUs; {meta['gpus'] or 'no GPU'}\n"
    )
    print(md)
    atomic_write_text(a.json, json.dumps(dict(meta=meta, rows=rows, table=md), indent=1))
    print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

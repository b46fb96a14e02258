"""Trainer overhead: scaletrain's Trainer against a hand-written PyTorch loop, same model, batches and optimizer.

    python benchmarks/overhead_cpu.py [--steps 30] [--rounds 3] [--device cpu|cuda] [--out DIR] [key=value ...]

Both loops do the same work per step: forward, cross-entropy, backward, grad-norm clipping, AdamW with the
same parameter groups and learning-rate schedule, and read the loss back (`.item()`), as the Trainer logs it.
The Trainer additionally writes metrics.jsonl and drives tqdm and its callbacks: that is the overhead measured.
Step time = wall time between the starts of consecutive steps (so the Trainer's logging is inside it),
median over the timed steps; the two loops alternate for `--rounds` rounds and the medians of rounds are compared.
Prints the ratio trainer/raw (target <= 1.05) and writes one JSON line to OUT/overhead.jsonl. Config overrides
(`model.n_layer=2 model.n_embd=32 ...`) change the model: a tiny one makes the step host-bound, so the difference
is the Trainer's own host work per step.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
import torch

from scaletrain.config import load_config
from scaletrain.data import BatchSampler
from scaletrain.engine import param_groups, adamw_kwargs, lr_at, lm_loss, set_lr
from scaletrain.models.spec import build_model
from scaletrain.train import Trainer, Callback, LMTask


class StepClock(Callback):
    "Wall-clock time at the start of every step."

    def __init__(self):
        self.t = []

    def before_step(self):
        self.t.append(time.perf_counter())

    def after_fit(self):
        self.t.append(time.perf_counter())


def step_times(stamps, skip):
    d = [b - a for a, b in zip(stamps, stamps[1:])]
    return d[skip:]


def raw_loop(cfg, sampler, device, steps, skip):
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)  # the config's family, as the Trainer builds it
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), **adamw_kwargs(cfg.train, device))
    stamps = []
    for step in range(steps):
        stamps.append(time.perf_counter())
        set_lr(opt, lr_at(step, cfg.train))
        x, y = sampler.batch(step, device=device)
        loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
    return step_times(stamps, skip)


def trainer_loop(overrides, out_dir, skip):
    cfg = load_config(overrides=overrides + [f"run.out_dir={out_dir}"])
    clock = StepClock()
    Trainer(cfg, callbacks=[clock]).fit()
    # the last interval includes the final evaluation and checkpoint: leave it out like the first ones
    return step_times(clock.t[:-1], skip)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps not timed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("overrides", nargs="*", help="config key=value, e.g. model.n_layer=2 model.n_embd=32")
    a = ap.parse_args()
    overrides = [
        f"train.steps={a.steps}",
        "train.eval_every=0",
        "train.eval_iters=1",
        "train.ckpt_every=0",
        f"train.device={a.device}",
        "train.warmup_steps=2",
        *a.overrides,
    ]
    task = LMTask(load_config(overrides=overrides), show_progress=False)  # same data and model shape as the Trainer
    cfg = task.resolved(task.cfg)  # the vocabulary the tokenizer sets
    device = torch.device(a.device)
    sampler = BatchSampler(
        task.data.train, task.data.weights, cfg.model.block_size, int(cfg.train.micro_batch), cfg.train.seed
    )
    tmp = Path(tempfile.mkdtemp())
    raw, tr = [], []
    for r in range(a.rounds):
        raw.append(statistics.median(raw_loop(cfg, sampler, device, a.steps, a.skip)))
        tr.append(statistics.median(trainer_loop(overrides, tmp / f"r{r}", a.skip)))
        print(f"round {r}: raw {raw[-1] * 1e3:.1f} ms/step, trainer {tr[-1] * 1e3:.1f} ms/step", flush=True)
    raw_s, tr_s = statistics.median(raw), statistics.median(tr)
    res = dict(
        bench="overhead",
        device=str(device),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        model=dict(
            family=cfg.model.family, n_layer=cfg.model.n_layer, n_embd=cfg.model.n_embd, block_size=cfg.model.block_size
        ),
        micro_batch=int(cfg.train.micro_batch),
        overrides=a.overrides,
        steps=a.steps,
        rounds=a.rounds,
        raw_ms=round(raw_s * 1e3, 2),
        trainer_ms=round(tr_s * 1e3, 2),
        ratio=round(tr_s / raw_s, 4),
    )
    print(json.dumps(res))
    print(f"trainer / raw step time = {res['ratio']:.3f} (target <= 1.05)")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out) / "overhead.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    sys.exit(main())

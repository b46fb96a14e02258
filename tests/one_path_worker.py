"""torchrun worker for test_one_path: the Trainer and a loop written by hand with `scaletrain.loop.setup`, on the same
model, batches and schedule, must train identically (the Trainer is built on that API: one code path).

argv: a JSON list of cases `{name, overrides}`, then the base overrides (data, cache, out_dir). Rank 0 prints one
JSON line per case: the Trainer's per-step losses, the hand loop's, and what the hand loop read back from the
Trainer's last checkpoint."""

import json
import sys
import torch
from scaletrain.config import load_config
from scaletrain.engine import adamw_kwargs, lm_loss, lr_at, param_groups
from scaletrain.loop import split_batch, setup
from scaletrain.models.spec import build_model
from scaletrain.train import Trainer


def hand_loop(cfg, trainer) -> tuple[list, dict]:
    "The Trainer's step written out with the public Loop calls; the batches are the Trainer's task's."
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    dev = trainer.device
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), **adamw_kwargs(cfg.train, dev))
    loop = setup(model, opt, cfg, loss_fn=lm_loss, verbose=False)
    n = cfg.train.grad_accum
    losses = []
    for step in range(cfg.train.steps):
        loop.set_lr(lr_at(step, cfg.train))
        x, y = trainer.task.train_batch(step, loop.dp_rank, loop.dp_size, loop.device)
        if loop.pipelined:
            total = sum(loop.pipeline_step(*split_batch((x, y), n, i), accum=n) for i in range(n)) / n
        else:
            total = torch.zeros(())
            for i in range(n):
                xm, ym = split_batch((x, y), n, i)
                with loop.accumulate(last=i == n - 1):
                    with loop.autocast():
                        logits = loop.model(xm)
                    loss = lm_loss(logits, ym) / n
                    loop.backward(loss)
                total += loss.detach()
            total = loop.reduce(total)
        loop.clip_grad_norm(cfg.train.grad_clip)
        loop.step(total)
        losses.append(float(total))
    st = loop.load(trainer.run_dir)  # the Trainer's checkpoint, read by the user API
    return losses, dict(step=st["step"], tokens=st["tokens"], global_batch=st["global_batch"])


def main(cases, base):
    for case in cases:
        cfg = load_config(overrides=[*base, f"run.name=onepath-{case['name']}", *case["overrides"]])
        tr = Trainer(cfg, default_callbacks=False)
        tr.fit()
        mine, read = hand_loop(tr.cfg, tr)
        if tr.info.is_main:
            theirs = [r["loss"] for r in tr.history]
            print(json.dumps(dict(name=case["name"], trainer=theirs, loop=mine, read=read, steps=tr.step)), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2:])

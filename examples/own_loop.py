"""Your own model, your own optimizer, your own loop, on scaletrain's strategies.

    scaletrain launch --nproc 2 examples/own_loop.py                # FSDP on 2 processes, a checkpoint every 2 steps
    scaletrain launch --nproc 2 examples/own_loop.py --stop-after 3 # stop early; then:
    scaletrain launch --resume runs/<run>                           # ... continues from its last checkpoint
    python examples/own_loop.py --strategy ddp                      # one process works too (plain PyTorch)

Every rank runs this file. `scaletrain.loop.setup` wraps the model and the optimizer for the layout asked for
(`parallel.strategy=fsdp` here); the loop is yours: the batch is a dict, the loss is yours, the optimizer is yours.
"""

import argparse
import json
import os
from pathlib import Path
import torch
import torch.nn as nn
import torch.nn.functional as F
from scaletrain.loop import setup

VOCAB, SEQ, BATCH = 32, 16, 8


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, 4, batch_first=True)
        self.norm2, self.ff = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        mask = torch.ones(x.size(1), x.size(1), dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class CountingLM(nn.Module):
    "A small decoder with names of its own; scaletrain finds its blocks (the ModuleList `stack`) by itself."

    def __init__(self, d=32, depth=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.where = nn.Parameter(torch.randn(SEQ, d) * 0.02)
        self.stack = nn.ModuleList([Block(d) for _ in range(depth)])
        self.unembed = nn.Linear(d, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens) + self.where[: tokens.size(1)]
        for blk in self.stack:
            x = blk(x)
        return self.unembed(x)


class MyAdamW(torch.optim.AdamW):
    "The user's optimizer (any torch.optim.Optimizer subclass works): AdamW whose update is clamped per element."

    def __init__(self, params, max_update=0.01, **kw):
        super().__init__(params, **kw)
        self.max_update = max_update

    @torch.no_grad()
    def step(self, closure=None):
        before = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        loss = super().step(closure)
        for b, p in zip(before, (p for g in self.param_groups for p in g["params"])):
            p.copy_(b + (p - b).clamp(-self.max_update, self.max_update))
        return loss


def batch_at(step: int) -> dict:
    "Step `step`'s global batch, the same on every rank: counting sequences (next token = this one + 1)."
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    seq = (start + torch.arange(SEQ + 1)) % VOCAB
    return {"tokens": seq[:, :-1], "next": seq[:, 1:]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="stop (with a checkpoint) after this many steps (0: never); a resume ignores it",
    )
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--strategy", default="fsdp")
    p.add_argument("--out", default=os.environ.get("SCALETRAIN_RUN_DIR", "runs/own_loop"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = CountingLM()
    # a factory: FSDP2 replaces the parameters by shards, so the optimizer is built (again) over those
    loop = setup(
        model,
        lambda params: MyAdamW(params, max_update=0.01, lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01),
        overrides=[f"parallel.strategy={a.strategy}", "train.device=cpu"],
    )
    step, stop_after = 0, a.stop_after
    if loop.latest(out) is not None:  # `scaletrain launch --resume` runs this file again: go on from the checkpoint
        step = loop.load(out)["step"]
        stop_after = 0  # the same arguments come again: this launch runs to --steps
        loop.print(f"resumed from step {step}")
        if loop.is_main and (out / "losses.jsonl").exists():  # steps after the checkpoint were not kept: drop them
            kept = [l for l in (out / "losses.jsonl").read_text().splitlines() if json.loads(l)["step"] <= step]
            (out / "losses.jsonl").write_text("".join(l + "\n" for l in kept))
    first = step
    while step < a.steps and not (stop_after and step - first >= stop_after):
        batch = loop.shard(batch_at(step))  # this data-parallel rank's half
        with loop.autocast():
            logits = loop.model(batch["tokens"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["next"].flatten())
        loop.backward(loss)
        norm = loop.clip_grad_norm(1.0)
        loop.step()
        step += 1
        mean = float(loop.reduce(loss))
        opt = loop.local_optimizer()
        if loop.is_main:
            rec = dict(step=step, loss=mean, grad_norm=float(norm), optimizer=type(opt).__name__)
            rec.update(betas=list(opt.param_groups[0]["betas"]), max_update=opt.max_update)
            with open(out / "losses.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
        if step % a.ckpt_every == 0 or step == a.steps or (stop_after and step - first >= stop_after):
            loop.save(out, step)  # sharded: each rank writes its own shard
    loop.print(f"done at step {step}")


if __name__ == "__main__":
    main()

"""Context-parallel attention's causal masks: the `CausalBias` eager attention uses against the boolean mask it builds
under `torch.compile` (dynamo cannot construct a CausalBias inside a graph). Time of forward+backward per rank.

    python benchmarks/cp_attention.py [--device cpu|cuda] [--cp 2] [--repeats 5] [--out DIR]

One process plays every rank of a `--cp`-way split in turn (the all-gather replaced by an index of the whole keys
and values, as the unit test does), for each shape (batch, query heads, key/value heads, sequence, head size):

- `bias_eager`: `causal_attention` as an eager run calls it (a `causal_lower_right` CausalBias per chunk);
- `mask_eager`: the same chunks with the boolean mask the compiled path builds, eager (the kernel SDPA picks for
  an explicit mask, without compile's fusion, so the two masks' kernels compare directly);
- `mask_compiled`: `causal_attention` under `torch.compile` (the path `train.compile=true parallel.cp>1` runs).

Time: the best of `--repeats` after two warm-ups, summed over the ranks (bf16 on CUDA, fp32 on CPU). Prints a
markdown table; one JSON line per row goes to OUT/cp_attention.jsonl. A GPU run answers whether the boolean mask
costs speed against CausalBias (on CUDA a CausalBias can select the flash kernel; a boolean mask cannot).
"""

import argparse
import functools
import unittest.mock
import json
from pathlib import Path
import torch
from scaletrain import context_parallel
from scaletrain.context_parallel import ContextParallel, causal_attention, causal_mask, head_tail_index
from timing import best_seconds  # benchmarks/timing.py (a script's folder is on sys.path)

SHAPES = {"cuda": [(4, 16, 8, 8192, 128), (2, 32, 8, 16384, 128)], "cpu": [(2, 4, 2, 256, 32), (1, 8, 2, 512, 32)]}


def mask_attention(cp, q, k, v):
    "`causal_attention` with the boolean masks of its compiled path, eager."
    with unittest.mock.patch.object(context_parallel, "causal_mask", functools.partial(causal_mask, tensor=True)):
        return causal_attention(q, k, v, enable_gqa=True)


def time_rank(fn, cp, q, k, v, device, repeats):
    "Best seconds of fn's forward+backward for rank `cp.rank`."

    def once():
        for t in (q, k, v):
            t.grad = None
        with cp:
            y = fn(cp, cp.shard(q, 2), k, v)
        y.float().sum().backward()

    return best_seconds(once, device, repeats, warmup=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    dt = torch.bfloat16 if a.device == "cuda" else torch.float32
    compiled = torch.compile(lambda cp, q, k, v: causal_attention(q, k, v, enable_gqa=True))
    variants = {
        "bias_eager": lambda cp, q, k, v: causal_attention(q, k, v, enable_gqa=True),
        "mask_eager": mask_attention,
        "mask_compiled": compiled,
    }
    rows = []
    for B, H, KV, T, Q in SHAPES[a.device]:
        g = torch.Generator(a.device).manual_seed(0)
        q = torch.randn(B, H, T, Q, device=a.device, dtype=dt, generator=g, requires_grad=True)
        k = torch.randn(B, KV, T, Q, device=a.device, dtype=dt, generator=g, requires_grad=True)
        v = torch.randn(B, KV, T, Q, device=a.device, dtype=dt, generator=g, requires_grad=True)
        order = torch.cat([head_tail_index(T, a.cp, r, a.device) for r in range(a.cp)])
        row = dict(shape=f"B{B} H{H} KV{KV} T{T} Q{Q}", device=a.device, cp=a.cp, torch=torch.__version__)
        cp = ContextParallel(group=None, size=a.cp, rank=a.cp - 1)  # the same numbers from every variant first
        cp.gather = lambda whole, dim=2, order=order: whole.index_select(dim, order)
        with cp, torch.no_grad():
            ys = [fn(cp, cp.shard(q, 2), k, v).float() for fn in variants.values()]
        tol = 2e-2 if dt == torch.bfloat16 else 1e-5
        assert all(torch.allclose(ys[0], y, rtol=tol, atol=tol) for y in ys[1:]), "the masks disagree"
        for name, fn in variants.items():
            total = 0.0
            for r in range(a.cp):
                cp = ContextParallel(group=None, size=a.cp, rank=r)
                cp.gather = lambda whole, dim=2, order=order: whole.index_select(dim, order)
                total += time_rank(fn, cp, q, k, v, a.device, a.repeats)
            row[name + "_ms"] = round(total * 1e3, 3)
        rows.append(row)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cp_attention.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"| shape (cp={a.cp}, {a.device}) | CausalBias eager ms | bool mask eager ms | bool mask compiled ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['bias_eager_ms']} | {r['mask_eager_ms']} | {r['mask_compiled_ms']} |")


if __name__ == "__main__":
    main()

"""The chunked output-layer loss against `F.cross_entropy` on full logits: time and peak memory of forward+backward.

    python benchmarks/loss_speed.py [--device cpu|cuda] [--repeats 3] [--out DIR]

For each shape (tokens N, width D, vocabulary V) both run the head matmul, the loss and the backward into `h` and
the head's weight, fp32 weights with bf16 autocast on CUDA (fp32 on CPU). Time: best of `--repeats` after one
warm-up. Peak: bytes of tensors alive at once beyond the inputs (CUDA: the allocator's peak; CPU: scaletrain's
`TensorMemoryTracker`). Also times AdamW's step over a 124M-parameter model's tensors, per-tensor loop vs fused.
Prints a markdown table and writes one JSON line per row to OUT/loss_speed.jsonl.
"""

import argparse
import contextlib
import json
import time
from pathlib import Path
import torch
import torch.nn.functional as F
from scaletrain.memory import TensorMemoryTracker
from timing import best_seconds  # benchmarks/timing.py (a script's folder is on sys.path)
from scaletrain.models.loss import auto_chunk, chunked_cross_entropy

SHAPES = [(2048, 256, 50257), (4096, 768, 50257), (2048, 512, 128256)]


def full(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y)


def run(fn, h, w, y, device, repeats):
    "(best seconds, peak bytes) of `fn(h, w, y).backward()`."
    amp = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def once():
        h.grad = w.grad = None
        with amp:
            loss = fn(h, w, y)
        loss.backward()

    best = best_seconds(once, device, repeats)
    h.grad = w.grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        once()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        tr = TensorMemoryTracker("cpu")
        with tr:
            once()
        peak = tr.peak
    return best, peak


def adamw(device, repeats):
    "ms per AdamW step over GPT-2 small's parameter shapes: the per-tensor loop (or foreach on CUDA) vs fused."
    d, L, V = 768, 12, 50257
    shapes = [(V, d), (1024, d)] + [s for _ in range(L) for s in [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,)]]
    ps = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    out = {}
    for name, kw in (("default", {}), ("fused", dict(fused=True))):
        opt = torch.optim.AdamW(ps, lr=1e-4, **kw)
        opt.step()
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[name] = best * 1000
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| tokens x width x vocab | chunk | full s | chunked s | full peak MiB | chunked peak MiB |")
    print("|---|---|---|---|---|---|")
    for N, D, V in SHAPES:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(N, D, generator=g).to(a.device).requires_grad_()
        w = (torch.randn(V, D, generator=g) * 0.02).to(a.device).requires_grad_()
        y = torch.randint(0, V, (N,), generator=g).to(a.device)
        c = auto_chunk(V)
        tf, pf = run(full, h, w, y, a.device, a.repeats)
        tc, pc = run(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk=c), h, w, y, a.device, a.repeats)
        row = dict(device=a.device, tokens=N, width=D, vocab=V, chunk=c, full_s=tf, chunked_s=tc, full_peak=pf)
        row["chunked_peak"] = pc
        rows.append(row)
        print(f"| {N} x {D} x {V} | {c} | {tf:.3f} | {tc:.3f} | {pf / 2**20:.0f} | {pc / 2**20:.0f} |")
    opt = adamw(a.device, a.repeats)
    print(f"AdamW step over GPT-2 small's tensors: default {opt['default']:.1f} ms, fused {opt['fused']:.1f} ms")
    rows.append(dict(device=a.device, adamw_ms=opt))
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"))
    with open(out / "loss_speed.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(dict(r, **meta)) + "\n")


if __name__ == "__main__":
    main()

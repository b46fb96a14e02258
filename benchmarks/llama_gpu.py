"""A ~1B-parameter `llama` on one GPU: the Trainer in bf16 and fp8 against a hand-written compiled loop; MFU.

    python benchmarks/llama_gpu.py [--out DIR] [--only NAME,...]   # on a CUDA machine (H100/H200 for fp8)
    python benchmarks/llama_gpu.py --tiny                          # anywhere (CPU): a 2-layer llama, a smoke check

Model: 18 layers x 2048 wide, 16 query heads of 128, 8 key/value heads (GQA), SwiGLU, vocabulary 32,000, context
2048 (0.97 B parameters with the untied head); micro-batch 4 x 2048 tokens, AdamW, bf16 autocast (`bf16-mixed`),
no checkpointing. Variants, each 5 untimed steps then the mean of 20 (as `gpu_anchors.py` times):

- `raw_compiled`: scaletrain's `Llama` and `lm_loss` in a hand-written loop, model and loss compiled as one graph,
  fused AdamW, no clipping, no logging: the yardstick;
- `trainer_bf16`: `scaletrain.train.Trainer`, `train.compile=true` (blocks and loss compiled), its defaults otherwise;
- `trainer_bf16_model`: the same with `train.compile_scope=model` (the whole model and its loss as one graph);
- `trainer_fp8_tensorwise`, `trainer_fp8_rowwise`: `memory.precision=fp8-mixed` (torchao float8 training),
  `memory.fp8_scaling=tensorwise|rowwise`, compiled; refused in one line where the GPU has no fp8 (the record says so).

MFU = model FLOPs per token (the spec's count, 6·N plus attention) x tokens/s / the GPU's dense bf16 peak
(`PEAK_TFLOPS`, default 989, an H100/H200 SXM). Every Trainer variant trains on the same stdlib tokens from the same
seed, so the loss after the last step is comparable: the fp8 rows record their loss relative to `trainer_bf16`'s.
One JSON line per variant goes to OUT/llama_gpu.jsonl; a table is printed at the end.
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
from overhead_gpu import StepClock, raw_step
from scaletrain.config import load_config
from scaletrain.engine import lm_loss
from scaletrain.errors import ConfigError
from scaletrain.models.spec import build_model, get_spec
from scaletrain.train import Trainer

FULL = dict(n_layer=18, n_embd=2048, n_head=16, n_kv_head=8, block_size=2048, vocab_size=32000, micro_batch=4)
TINY = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=128, vocab_size=512, micro_batch=4)


def overrides(shape: dict) -> list[str]:
    s = dict(shape)
    B = s.pop("micro_batch")
    return (
        ["model.family=llama", "model.tie_weights=false", "model.dropout=0"]
        + [f"model.{k}={v}" for k, v in s.items()]
        + [f"train.micro_batch={B}", f"train.eval_batch={B}"]
    )


def run_raw(shape: dict, dev, warm: int, n: int) -> float:
    "Seconds per step of the hand-written compiled loop."
    c = load_config(overrides=overrides(shape)).model
    torch.manual_seed(0)
    m = build_model(c).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4, fused=True)
    step = raw_step(torch.compile(lambda x, y: lm_loss(m(x), y)), opt, dev)  # model and loss: one graph
    data = A.batches(shape["micro_batch"], shape["block_size"], shape["vocab_size"], dev)
    return A.timed(step, data, dev, warm, n)  # timed as the anchors time


def run_trainer(shape: dict, dev, warm: int, n: int, work: Path, extra=()):
    ov = overrides(shape) + [
        f"train.steps={warm + n}",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.ckpt_every=0",
        f"train.device={dev.type}",
        "memory.precision=bf16-mixed",
        "train.compile=true",
        f"run.out_dir={work}",
        f"data.cache_dir={work.parent / 'cache'}",  # tokenized once for every variant
        *extra,
    ]
    clock = StepClock()
    t = Trainer(load_config(overrides=ov), callbacks=[clock])
    s = t.fit()
    d = [b - a for a, b in zip(clock.t, clock.t[1:])][warm : warm + n]
    return sum(d) / len(d), t.history[-1]["loss"], s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    shape, warm, n = (TINY, 2, 3) if a.tiny else (FULL, 5, 20)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
    mc = load_config(overrides=overrides(shape)).model
    spec = get_spec("llama")
    fpt, n_params = spec.flops_per_token(mc), spec.shape(mc).n_params()
    tokens = shape["micro_batch"] * shape["block_size"]
    info = dict(
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        n_params=n_params,
        tokens_per_step=tokens,
        date=time.strftime("%Y-%m-%d"),
    )
    print(f"llama_gpu: {n_params / 1e9:.2f} B parameters, {tokens} tokens per step, on {info['device']}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llama_gpu_"))
    only = set(filter(None, a.only.split(",")))
    plan = [
        ("raw_compiled", None),
        ("trainer_bf16", []),
        ("trainer_bf16_model", ["train.compile_scope=model"]),
        ("trainer_fp8_tensorwise", ["memory.precision=fp8-mixed", "memory.fp8_scaling=tensorwise"]),
        ("trainer_fp8_rowwise", ["memory.precision=fp8-mixed", "memory.fp8_scaling=rowwise"]),
    ]
    res = []
    for name, extra in plan:
        if only and name not in only:
            continue
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        r = dict(name=name, **info)
        try:
            if extra is None:
                step_s, loss = run_raw(shape, dev, warm, n), None
            else:
                step_s, loss, _ = run_trainer(shape, dev, warm, n, work / name, extra)
            tok_s = tokens / step_s
            r.update(step_ms=round(step_s * 1e3, 2), tokens_per_s=round(tok_s), mfu=round(fpt * tok_s / peak, 4))
            r.update(
                loss=loss,
                peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None,
            )
        except ConfigError as e:  # fp8 where the GPU has none: the one-line refusal is the result
            r.update(refused=str(e))
        except Exception as e:  # one variant failing must not lose the others
            import traceback

            traceback.print_exc()
            r.update(error=repr(e)[:300])
        res.append(r)
        print(json.dumps(r), flush=True)
        with open(out / "llama_gpu.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        gc.collect()
        torch._dynamo.reset()
    by = {r["name"]: r for r in res}
    raw, bf16 = by.get("raw_compiled", {}), by.get("trainer_bf16", {})
    print(f"\n{'variant':<24} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'vs raw':>7} {'vs bf16':>8} {'loss':>8}")
    for r in res:
        if "tokens_per_s" not in r:
            print(f"{r['name']:<24} {r.get('refused') or r.get('error')}")
            continue
        vs_raw = f"{r['tokens_per_s'] / raw['tokens_per_s']:.3f}" if "tokens_per_s" in raw else "-"
        vs_bf16 = f"{r['tokens_per_s'] / bf16['tokens_per_s']:.3f}" if "tokens_per_s" in bf16 else "-"
        loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "-"
        print(
            f"{r['name']:<24} {r['step_ms']:>9.2f} {r['tokens_per_s']:>10,} {r['mfu']:>6.3f} {vs_raw:>7} {vs_bf16:>8} "
            f"{loss:>8}"
        )
    if bf16.get("loss") is not None:
        for r in res:
            if r["name"].startswith("trainer_fp8") and r.get("loss") is not None:
                print(
                    f"{r['name']}: loss {r['loss']:.4f} vs bf16 {bf16['loss']:.4f} "
                    f"({r['loss'] / bf16['loss'] - 1:+.2%})"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

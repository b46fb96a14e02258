"""The memory estimator of this checkout against the peaks `memory_gpu.py` recorded on a GPU earlier.

    python benchmarks/estimate_vs_recorded.py [RECORDS.jsonl] [--run N] [--json OUT.json]

Re-estimates every record of a `memory_gpu.jsonl` (default: the H200 run of 2026-11-27, its run 2) with
`scaletrain.memory.estimate_config` for the configuration that was measured, and prints measured against estimated
peaks. It runs anywhere (no GPU): the numbers it compares with are the recorded measurements, not new ones, so a
change to the estimator can be checked between GPU loans; the GPU run (`run_gpu.sh`) is what measures again. Switches
added after the recording are set as those runs had them: `memory.selective_compile=off` (eager unless
`train.compile`) and `memory.chunked_loss=off` (full logits).
"""

from __future__ import annotations
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from scaletrain.config import Config, ModelConfig
from scaletrain.memory import GiB, estimate_config

HERE = Path(__file__).resolve().parent
DEFAULT = HERE / "results" / "h200-2026-11-27" / "memory_gpu.jsonl"
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, family="gpt", bias=True)  # memory_gpu.py's


def re_estimate(rec: dict):
    cfg = Config()
    cfg.model = ModelConfig(**GPT2_SMALL, block_size=rec["seq_len"])
    cfg.memory.precision, cfg.memory.ac_every = rec["precision"], 2
    cfg.memory.activation_checkpointing = rec["ac"].removesuffix("-eager")
    cfg.memory.selective_compile = "off" if rec["ac"].endswith("-eager") or "compiled" not in rec else "auto"
    cfg.memory.chunked_loss = "off"
    cfg.train.compile = rec["compile"]
    return estimate_config(cfg, 1, rec["micro_batch"], device="cuda")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("records", nargs="?", default=str(DEFAULT))
    p.add_argument("--run", type=int, default=2, help="the records' run tag to take (0: all)")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    recs = [json.loads(line) for line in Path(a.records).read_text().splitlines() if line.strip()]
    recs = [r for r in recs if not a.run or r.get("run") == a.run]
    rows = []
    print("| precision | compile | AC | measured peak GiB | estimate then GiB (error) | estimate now GiB | error now |")
    print("|---|---|---|---|---|---|---|")
    for r in recs:
        e = re_estimate(r)
        err = e.total / r["peak_bytes"] - 1
        rows.append(
            dict(
                precision=r["precision"],
                compile=r["compile"],
                ac=r["ac"],
                peak_bytes=r["peak_bytes"],
                estimate_then=r["estimate_bytes"],
                estimate_now=e.total,
                error_now=err,
                activation_bytes=r["activation_bytes"],
                estimate_activation_now=e.activations,
            )
        )
        print(
            f"| {r['precision']} | {'yes' if r['compile'] else 'no'} | {r['ac']} | {r['peak_bytes'] / GiB:.2f} | "
            f"{r['estimate_bytes'] / GiB:.2f} ({r['error']:+.1%}) | {e.total / GiB:.2f} | {err:+.1%} |"
        )
    worst = max(abs(x["error_now"]) for x in rows)
    src = Path(a.records).resolve()
    shown = src.relative_to(HERE.parent) if src.is_relative_to(HERE.parent) else src
    print(f"\n{len(rows)} records of {shown}: largest error now {worst:.1%}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run under torchrun by test_parallel.py: train each case of a JSON spec on every rank and record
per-step losses, the full final weights this rank can see, the bytes this rank really holds, and what dynamo compiled
(frames compiled and graph breaks, from `torch._dynamo.utils.counters`).

usage: torchrun --nproc-per-node N dist_worker.py SPEC.json OUT_DIR
"""

import json
import os
import sys
from pathlib import Path
import torch
import torch.distributed as dist

from scaletrain.config import load_config
from scaletrain.train import Trainer, StopAfter
from scaletrain.dist import teardown


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def full_weights(engine):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions

    sd = get_model_state_dict(engine.module, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    return {k: local(v).detach().float().cpu().clone() for k, v in sd.items()}


def dynamo_counts() -> tuple[int, dict]:
    "(frames dynamo compiled, graph breaks by reason) so far in this process."
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"], dict(counters["graph_break"])


def main(spec_path, out_dir):
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    for case in spec["cases"]:
        cfg = load_config(overrides=spec["common"] + case["overrides"] + [f"run.out_dir={out / case['name']}"])
        cbs = [StopAfter(case["stop_after"])] if case.get("stop_after") else []
        if case.get("nan_at"):  # a NaN output at these steps (test_hostile_checkpoints: non-finite steps)
            from test_hostile_checkpoints import NaNAt

            cbs.append(NaNAt(*case["nan_at"]))
        run_dir = None
        if case.get("resume_of"):
            run_dir = Path((out / case["resume_of"] / "run_dir.txt").read_text())
            cfg = load_config(run_dir / "config.yaml", case["overrides"])  # a resume may change the layout
        t = Trainer(cfg, run_dir=run_dir, resume=bool(case.get("resume_of")), callbacks=cbs)
        frames, breaks = dynamo_counts()
        s = t.fit()
        frames_now, breaks_now = dynamo_counts()
        rank = dist.get_rank()  # bytes this rank holds, as Engine.state_bytes counts them (local shards)
        res = dict(
            summary=s,
            losses=[r["loss"] for r in t.history],
            grad_norms=[r["grad_norm"] for r in t.history],
            val=t.last_val,
            weights=full_weights(t.engine),
            engine=t.engine.name,
            param_bytes=s["state_bytes_per_rank"][rank]["params"],
            optim_bytes=s["state_bytes_per_rank"][rank]["optim"],
            compiled_frames=frames_now - frames,
            graph_breaks={k: n - breaks.get(k, 0) for k, n in breaks_now.items() if n > breaks.get(k, 0)},
        )
        (out / case["name"]).mkdir(parents=True, exist_ok=True)
        torch.save(res, out / case["name"] / f"rank{rank}.pt")
        if rank == 0:
            (out / case["name"] / "run_dir.txt").write_text(str(t.run_dir))
        dist.barrier()
    teardown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    # end the rank here: at interpreter finalisation gloo's threads of still-referenced process groups (a DeviceMesh's)
    # can abort a rank that finished cleanly (torch 2.13 on CPU); everything is written and flushed by now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""Run under torchrun by test_own_model.py: each case of a JSON spec trains a user-written model with the user's own
loop on `scaletrain.loop.setup`, and every rank records what it saw (see own_model_helpers.run_case).

usage: torchrun --nproc-per-node N own_model_worker.py SPEC.json OUT_DIR
"""

import json
import os
import sys
from pathlib import Path
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from own_model_helpers import run_case  # noqa: E402
from scaletrain.dist import teardown  # noqa: E402
from scaletrain.errors import ConfigError  # noqa: E402


def main(spec_path, out_dir):
    out = Path(out_dir)
    for case in json.loads(Path(spec_path).read_text()):
        try:
            res = run_case(
                case["kind"],
                case["overrides"],
                accum=case.get("accum", 1),
                sched=case.get("sched", False),
                tp_plan=case.get("tp_plan"),
                pp_rows=case.get("pp_rows"),
                nan_at=case.get("nan_at"),
                opt=case.get("opt"),
                spare=case.get("spare", False),
                pp_split=case.get("pp_split"),
                sched_after=case.get("sched_after", False),
            )
        except ConfigError as e:  # a refusal case: the message is what the test checks
            if not case.get("refused"):
                raise
            res = dict(error=str(e))
        (out / case["name"]).mkdir(parents=True, exist_ok=True)
        torch.save(res, out / case["name"] / f"rank{dist.get_rank()}.pt")
        dist.barrier()
    teardown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as dist_worker.py: gloo's threads at interpreter finalisation can abort a finished rank

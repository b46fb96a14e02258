"""torchrun worker for test_memory: the bytes each rank really holds vs `scaletrain.memory.estimate`.

For every family (gpt: GPT-2's layout with biases; llama: RMSNorm, SwiGLU, rotary positions and grouped-query
attention with fewer key/value heads than query heads) and every layout it builds the engine with
`scaletrain.parallel.build_engine`, runs one step (so AdamW's state exists) and one more forward/backward with
gradient sync (so gradients exist), then counts the bytes of this rank's parameters, gradients and optimizer state
(local shards of DTensors). Rank 0 prints one JSON line per layout with every rank's counts and the estimate.
The layouts depend on the world size: the 1-D and 2-D ones on 2 ranks, the 3-D ones (tp x pp, FSDP2 x pp, hsdp) on 4,
fsdp x tp x pp on 8.
"""

import json
import sys
import os
import torch
import torch.distributed as dist
from scaletrain.config import Config
from scaletrain.dist import ParallelDims, init_distributed
from scaletrain.models.spec import build_model
from scaletrain.loop import Loop
from scaletrain.parallel import build_engine
from scaletrain.memory import estimate_config, model_state_bytes

FAMILIES = {
    "gpt": dict(family="gpt", bias=True),
    "llama": dict(family="llama", n_kv_head=2),  # 4 query heads share 2 key/value heads; FFN width 192
}
LAYOUTS = [
    dict(strategy="ddp", precisions=("fp32", "bf16-mixed")),
    dict(strategy="zero1"),
    dict(strategy="zero2"),
    dict(strategy="fsdp", precisions=("fp32", "bf16-true")),
] + [
    dict(strategy="ddp", tp=2),
    dict(strategy="ddp", pp=2, tie=False),
    dict(strategy="zero1", backend="fairscale"),
    dict(strategy="zero2", backend="fairscale"),
]
LAYOUTS_BY_WORLD = {
    2: LAYOUTS,
    4: [
        dict(strategy="ddp", tp=2, pp=2, tie=False),
        dict(strategy="fsdp", pp=2, tie=False, precisions=("fp32", "bf16-true")),
        dict(strategy="zero2", pp=2, tie=False),
        dict(strategy="hsdp", dp_shard=2),
        dict(strategy="fsdp", cp=2),  # sharded over dp x cp = 4
        dict(strategy="zero2", tp=2),
    ],
    8: [
        dict(strategy="fsdp", tp=2, pp=2, tie=False),
        dict(strategy="hsdp", dp_shard=2, tp=2),
        dict(strategy="fsdp", tp=2, cp=2),
    ],
}


def main():
    info = init_distributed("cpu")
    for family, shape in FAMILIES.items():
        for lay in LAYOUTS_BY_WORLD[info.world_size]:
            for precision in lay.get("precisions", ("fp32",)):
                one(info, family, shape, lay, precision)
    dist.destroy_process_group()


def one(info, family: str, shape: dict, lay: dict, precision: str):
    "Build one layout of one family, make its optimizer state and gradients, print what every rank holds."
    cfg = Config()
    m = cfg.model
    for k, v in shape.items():
        setattr(m, k, v)
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 4, 4, 64, 32, 257
    m.tie_weights = lay.get("tie", True)
    p = cfg.parallel
    p.strategy, p.tp, p.pp, p.backend, p.dp_shard = (
        lay["strategy"],
        lay.get("tp", 1),
        lay.get("pp", 1),
        lay.get("backend", "torch"),
        lay.get("dp_shard", 0),
    )
    p.cp = lay.get("cp", 1)
    cfg.memory.precision = precision
    cfg.train.micro_batch = 4
    mesh = ParallelDims.from_config(cfg, info.world_size).mesh(info.device.type)
    torch.manual_seed(0)
    eng = build_engine(build_model(m), cfg, info.device, info, mesh)
    g = torch.Generator().manual_seed(eng.dp_rank)
    x = torch.randint(0, 257, (4, 32), generator=g)
    y = torch.randint(0, 257, (4, 32), generator=g)
    Loop.of(eng).train_step([(x, y)], 1e-3)
    held = model_state_bytes(eng.module, eng.optimizer)
    # the step ends with zero_grad: gradients are made again by a forward/backward with gradient sync
    if hasattr(eng, "schedule"):  # pipeline: gradients come from a schedule step; keep them by skipping the optimizer
        eng._accum_scale = 1.0 / eng.n_mb
        eng._run(x, y, train=True)
    else:
        with eng.sync(last_micro=True):
            eng.forward_loss(x, y).backward()
    held["grads"] = model_state_bytes(eng.module)["grads"]
    allh = [None] * info.world_size
    dist.all_gather_object(allh, held)
    est = estimate_config(cfg, info.world_size, device="cpu")
    if info.rank == 0:
        print(
            json.dumps(
                dict(
                    family=family,
                    layout=lay,
                    precision=precision,
                    ranks=allh,
                    estimate=dict(params=est.params, grads=est.grads, optimizer=est.optimizer),
                )
            ),
            flush=True,
        )
    dist.barrier()


if __name__ == "__main__":
    main()
    # end the rank here: at interpreter finalisation gloo's threads of still-referenced process groups (a DeviceMesh's)
    # can abort a rank that finished cleanly (torch 2.13 on CPU); everything is written and flushed by now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""torchrun worker for test_activations: activation checkpointing composes with DDP and FSDP2 (2 ranks, gloo, CPU).

For each (family, wrapper, policy) the worker trains one step from the same weights on the same data and prints one
JSON line per case with the loss and the max abs difference of the gradients (full, unsharded) from no checkpointing.
"""

import copy
import json
import sys
import os
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from scaletrain.config import ModelConfig, MemoryConfig
from scaletrain.models.spec import build_model, spec_for
from scaletrain.engine import lm_loss
from scaletrain.activations import apply_activation_checkpointing

SHAPES = {  # gpt as nanoGPT; llama with grouped-query attention
    "gpt": dict(family="gpt", bias=True, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=257),
    "llama": dict(family="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=257),
}
POLICIES = [("none", False), ("full", False), ("selective", False), ("every_k", False), ("full", True)]


def grads(m):
    out = {}
    for n, p in m.named_parameters():
        gr = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[n.replace("._checkpoint_wrapped_module", "")] = gr
    return out


def one_step(base, wrapper, policy, offload, x, y):
    "Loss and full gradients of one step of a copy of `base`, checkpointed by `policy`, then wrapped."
    m = apply_activation_checkpointing(
        copy.deepcopy(base), MemoryConfig(activation_checkpointing=policy, ac_offload=offload)
    )
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(m)
    else:
        from torch.distributed.fsdp import fully_shard

        for blk in spec_for(m).block_modules(m).values():
            fully_shard(blk)
        model = fully_shard(m)
    loss = lm_loss(model(x), y)
    loss.backward()
    return loss.item(), grads(m), list(m.state_dict()) == list(base.state_dict())


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x, y = torch.randint(0, 257, (2, 16), generator=g), torch.randint(0, 257, (2, 16), generator=g)
    for family, shape in SHAPES.items():
        torch.manual_seed(0)
        base = build_model(ModelConfig(**shape))
        for wrapper in ("ddp", "fsdp"):
            ref_loss, ref = None, None
            for policy, offload in POLICIES:  # "none" first: the reference
                loss, gr, keys_same = one_step(base, wrapper, policy, offload, x, y)
                if ref is None:
                    ref_loss, ref = loss, gr
                diff = max((gr[k] - ref[k]).abs().max().item() for k in ref)
                if rank == 0:
                    row = dict(family=family, wrapper=wrapper, policy=policy, offload=offload, loss=loss)
                    row.update(loss_diff=abs(loss - ref_loss), grad_diff=diff, keys_same=keys_same)
                    print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # end the rank here: at interpreter finalisation gloo's threads of still-referenced process groups (a DeviceMesh's)
    # can abort a rank that finished cleanly (torch 2.13 on CPU); everything is written and flushed by now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""torchrun worker for test_activations: activation checkpointing composes with DDP and FSDP2 (2 ranks, gloo, CPU).

For each (wrapper, policy) the worker trains one step from the same weights on the same data and prints one JSON
line per case with the loss and the max abs difference of the gradients (full, unsharded) from no checkpointing.
"""

import copy
import json
import torch
import torch.distributed as dist
from scaletrain.config import ModelConfig, MemoryConfig
from scaletrain.models.gpt import GPT
from scaletrain.engine import lm_loss
from scaletrain.activations import apply_activation_checkpointing


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    base = GPT(ModelConfig(family="gpt", bias=True, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=257))
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x, y = torch.randint(0, 257, (2, 16), generator=g), torch.randint(0, 257, (2, 16), generator=g)
    policies = [("none", False), ("full", False), ("selective", False), ("every_k", False), ("full", True)]
    from torch.distributed.tensor import DTensor

    def grads(m):
        out = {}
        for n, p in m.named_parameters():
            gr = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            out[n.replace("._checkpoint_wrapped_module", "")] = gr
        return out

    results = {}
    for wrapper in ("ddp", "fsdp"):
        for policy, offload in policies:
            m = apply_activation_checkpointing(
                copy.deepcopy(base), MemoryConfig(activation_checkpointing=policy, ac_offload=offload)
            )
            if wrapper == "ddp":
                from torch.nn.parallel import DistributedDataParallel as DDP

                model = DDP(m)
            else:
                from torch.distributed.fsdp import fully_shard

                for blk in m.blocks.values():
                    fully_shard(blk)
                model = fully_shard(m)
            loss = lm_loss(model(x), y)
            loss.backward()
            gr = grads(m)
            key = (wrapper, policy, offload)
            results[key] = (loss.item(), gr)
            ref_loss, ref = results[(wrapper, "none", False)]
            diff = max((gr[k] - ref[k]).abs().max().item() for k in ref)
            if rank == 0:
                print(
                    json.dumps(
                        dict(
                            wrapper=wrapper,
                            policy=policy,
                            offload=offload,
                            loss=loss.item(),
                            loss_diff=abs(loss.item() - ref_loss),
                            grad_diff=diff,
                            keys_same=list(m.state_dict()) == list(base.state_dict()),
                        )
                    ),
                    flush=True,
                )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"Activation checkpointing: every policy computes the same numbers, keeps checkpoints portable, composes with DDP/FSDP2."

import copy
import pytest
import torch
from conftest import run_cli, tiny, torchrun_rows
from scaletrain.config import ConfigError, MemoryConfig, ModelConfig, load_config
from scaletrain.models.gpt import GPT
from scaletrain.engine import lm_loss
from scaletrain.activations import apply_activation_checkpointing, is_checkpointed
from scaletrain.train import Trainer

POLICIES = [
    ("full", False, 2),
    ("selective", False, 2),
    ("every_k", False, 1),
    ("every_k", False, 2),
    ("every_k", False, 3),
    ("full", True, 2),
    ("every_k", True, 2),
]


def _model(**kw):
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**dict(family="gpt", bias=True, n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=257), **kw}))


def _loss_grads(m, x, y, autocast=False):
    torch.manual_seed(1)  # dropout stream
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = m(x)
    loss = lm_loss(logits, y)
    loss.backward()
    return loss.item(), {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("policy,offload,k", POLICIES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_policy_gives_identical_loss_and_grads(policy, offload, k, dropout):
    base = _model(dropout=dropout)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 257, (4, 16), generator=g), torch.randint(0, 257, (4, 16), generator=g)
    ref_loss, ref = _loss_grads(copy.deepcopy(base), x, y)
    m = apply_activation_checkpointing(
        copy.deepcopy(base), MemoryConfig(activation_checkpointing=policy, ac_offload=offload, ac_every=k)
    )
    wrapped = [key for key, b in m.blocks.items() if is_checkpointed(b)]
    assert wrapped == ([key for key in m.blocks if (int(key) + 1) % k == 0] if policy == "every_k" else list(m.blocks))
    loss, grads = _loss_grads(m, x, y)
    assert loss == ref_loss
    for n, gr in ref.items():
        assert torch.equal(grads[n], gr), n


@pytest.mark.parametrize("policy,offload", [("full", True), ("selective", False), ("full", False)])
def test_recomputation_uses_the_forward_autocast_dtype(policy, offload):
    # fairscale 0.4.13 alone would recompute outside CPU autocast (and in fp16 on CUDA); scaletrain pins the forward's state
    base = _model()
    x, y = torch.randint(0, 257, (2, 16)), torch.randint(0, 257, (2, 16))
    ref_loss, ref = _loss_grads(copy.deepcopy(base), x, y, autocast=True)
    m = apply_activation_checkpointing(
        copy.deepcopy(base), MemoryConfig(activation_checkpointing=policy, ac_offload=offload)
    )
    loss, grads = _loss_grads(m, x, y, autocast=True)
    assert loss == ref_loss and all(torch.equal(grads[n], g) for n, g in ref.items())


def test_state_dict_is_portable_across_policies():
    plain = _model()
    keys = list(plain.state_dict())
    for policy, offload in [("full", False), ("selective", False), ("full", True)]:
        m = apply_activation_checkpointing(_model(), MemoryConfig(activation_checkpointing=policy, ac_offload=offload))
        assert list(m.state_dict()) == keys
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
        fresh = _model()
        fresh.load_state_dict(m.state_dict(), strict=True)  # checkpointed -> plain
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))
        again = apply_activation_checkpointing(
            _model(), MemoryConfig(activation_checkpointing=policy, ac_offload=offload)
        )
        again.load_state_dict(fresh.state_dict(), strict=True)  # plain -> checkpointed
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values()))


def test_applying_twice_wraps_once():
    m = apply_activation_checkpointing(_model(), MemoryConfig(activation_checkpointing="full"))
    inner = [type(b._checkpoint_wrapped_module).__name__ for b in m.blocks.values()]
    apply_activation_checkpointing(m, MemoryConfig(activation_checkpointing="full"))
    assert [type(b._checkpoint_wrapped_module).__name__ for b in m.blocks.values()] == inner == ["Block"] * 3


def test_trainer_losses_equal_under_every_policy(tmp_path, corpus, cache_dir):
    def losses(*extra):
        tr = Trainer(
            load_config(
                overrides=tiny(
                    corpus,
                    cache_dir,
                    tmp_path,
                    "train.steps=3",
                    "train.ckpt_every=0",
                    "train.eval_every=0",
                    "train.eval_iters=1",
                    *extra,
                )
            ),
            default_callbacks=False,
        )
        tr.fit()
        return [r["loss"] for r in tr.history], tr

    ref, _ = losses()
    for extra in (
        ["memory.activation_checkpointing=selective"],
        ["memory.activation_checkpointing=full", "memory.ac_offload=true"],
    ):
        got, tr = losses(*extra)
        assert all(is_checkpointed(b) for b in tr.model.blocks.values()), extra  # the Trainer's engine applied it
        assert got == ref, extra


def test_impossible_combinations_are_refused_in_one_line(tmp_path, corpus, cache_dir):
    r = run_cli(
        "train",
        *tiny(corpus, cache_dir, tmp_path, "memory.activation_checkpointing=selective", "memory.ac_offload=true"),
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "use full or every_k" in r.stderr
    assert not any(tmp_path.iterdir())  # refused before any run folder exists
    with pytest.raises(ConfigError, match="checkpoints none of"):
        load_config(overrides=["memory.activation_checkpointing=every_k", "memory.ac_every=9", "model.n_layer=4"])


def test_selective_refuses_a_block_that_mutates_a_kept_output():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, x):
            y = self.fc(x)
            y.mul_(2.0)
            return x + torch.relu(y)

    m = _model()
    for k in m.blocks:
        m.blocks[k] = Scaled()
    with pytest.raises(ConfigError, match="selective") as e:
        apply_activation_checkpointing(m, MemoryConfig(activation_checkpointing="selective"))
    assert "\n" not in str(e.value)
    apply_activation_checkpointing(
        _model(), MemoryConfig(activation_checkpointing="selective")
    )  # the GPT itself passes


def test_composes_with_ddp_and_fsdp2():
    "2 ranks (gloo): each policy under DDP and under FSDP2 fully_shard applied after it equals no checkpointing."
    rows = torchrun_rows("ac_compose_worker.py")
    assert {(x["wrapper"], x["policy"], x["offload"]) for x in rows} == {
        (w, p, o)
        for w in ("ddp", "fsdp")
        for p, o in [("none", False), ("full", False), ("selective", False), ("every_k", False), ("full", True)]
    }
    for x in rows:
        assert x["loss_diff"] == 0.0 and x["grad_diff"] == 0.0 and x["keys_same"], x

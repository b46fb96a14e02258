"""Activation checkpointing, for both model families (gpt; llama with grouped-query attention): every policy computes
the same numbers, really recomputes, keeps checkpoints portable, composes with DDP/FSDP2."""

import copy
import pytest
import torch
from conftest import run_cli, tiny, torchrun_rows
from scaletrain.config import ConfigError, MemoryConfig, ModelConfig, load_config
from scaletrain.models.spec import build_model, spec_for
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


FAMILIES = {  # tiny models of each family
    "gpt": dict(family="gpt", bias=True, n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=257),
    "llama": dict(family="llama", n_layer=4, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=257),
}


def _model(family="gpt", **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**FAMILIES[family], **kw}))


def _blocks(m):
    return spec_for(m).block_modules(m)


def _loss_grads(m, x, y, autocast=False):
    torch.manual_seed(1)  # dropout stream
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = m(x)
    loss = lm_loss(logits, y)
    loss.backward()
    return loss.item(), {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("policy,offload,k", POLICIES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_policy_gives_identical_loss_and_grads(policy, offload, k, dropout, family):
    base = _model(family, dropout=dropout)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 257, (4, 16), generator=g), torch.randint(0, 257, (4, 16), generator=g)
    ref_loss, ref = _loss_grads(copy.deepcopy(base), x, y)
    m = apply_activation_checkpointing(
        copy.deepcopy(base), MemoryConfig(activation_checkpointing=policy, ac_offload=offload, ac_every=k)
    )
    blocks = _blocks(m)
    wrapped = [key for key, b in blocks.items() if is_checkpointed(b)]
    assert wrapped == ([key for key in blocks if (int(key) + 1) % k == 0] if policy == "every_k" else list(blocks))
    loss, grads = _loss_grads(m, x, y)
    assert loss == ref_loss
    for n, gr in ref.items():
        assert torch.equal(grads[n], gr), n


@pytest.mark.parametrize("policy,offload", [("full", True), ("selective", False), ("full", False)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_recomputation_uses_the_forward_autocast_dtype(policy, offload, family):
    # fairscale 0.4.13 alone would recompute outside CPU autocast (and in fp16 on CUDA);
    # scaletrain pins the forward's state
    base = _model(family)
    x, y = torch.randint(0, 257, (2, 16)), torch.randint(0, 257, (2, 16))
    ref_loss, ref = _loss_grads(copy.deepcopy(base), x, y, autocast=True)
    m = apply_activation_checkpointing(
        copy.deepcopy(base), MemoryConfig(activation_checkpointing=policy, ac_offload=offload)
    )
    loss, grads = _loss_grads(m, x, y, autocast=True)
    assert loss == ref_loss and all(torch.equal(grads[n], g) for n, g in ref.items())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_is_portable_across_policies(family):
    plain = _model(family)
    keys = list(plain.state_dict())
    for policy, offload in [("full", False), ("selective", False), ("full", True)]:
        m = apply_activation_checkpointing(
            _model(family), MemoryConfig(activation_checkpointing=policy, ac_offload=offload)
        )
        assert list(m.state_dict()) == keys
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
        fresh = _model(family)
        fresh.load_state_dict(m.state_dict(), strict=True)  # checkpointed -> plain
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))
        again = apply_activation_checkpointing(
            _model(family), MemoryConfig(activation_checkpointing=policy, ac_offload=offload)
        )
        again.load_state_dict(fresh.state_dict(), strict=True)  # plain -> checkpointed
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_applying_twice_wraps_once(family):
    m = apply_activation_checkpointing(_model(family), MemoryConfig(activation_checkpointing="full"))
    inner = [type(b._checkpoint_wrapped_module).__name__ for b in _blocks(m).values()]
    apply_activation_checkpointing(m, MemoryConfig(activation_checkpointing="full"))
    n = FAMILIES[family]["n_layer"]
    assert [type(b._checkpoint_wrapped_module).__name__ for b in _blocks(m).values()] == inner
    assert inner == [spec_for(m).block_cls.__name__] * n


# the sub-layers of a block: the checkpointed block's forward calls each once, and once more when recomputed
SUBLAYERS = {"gpt": ("attn", "mlp"), "llama": ("attention", "feed_forward")}
RECOMPUTE = [("none", False), ("full", False), ("selective", False), ("every_k", False), ("full", True)]


def _training_step_counts(family, policy, offload, k=2):
    """One forward + backward: how often each sub-layer's forward started (pre-hooks: torch's non-reentrant
    recomputation stops as soon as the last saved tensor is back, before the block's last module returns) and the
    FLOPs of the backward (recomputed forwards included)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = apply_activation_checkpointing(
        _model(family), MemoryConfig(activation_checkpointing=policy, ac_offload=offload, ac_every=k)
    )
    calls = dict.fromkeys(SUBLAYERS[family], 0)
    for blk in _blocks(m).values():
        inner = getattr(blk, "_checkpoint_wrapped_module", blk)
        for name in calls:
            getattr(inner, name).register_forward_pre_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 257, (2, 16), generator=g), torch.randint(0, 257, (2, 16), generator=g)
    loss = lm_loss(m(x), y)
    with FlopCounterMode(display=False) as flops:
        loss.backward()
    return calls, flops.get_total_flops(), m


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recomputation_really_happens(family):
    "No AC runs each block once per step; full and selective twice; every_k(2) re-runs every second block."
    L = FAMILIES[family]["n_layer"]
    expected = {"none": L, "full": 2 * L, "selective": 2 * L, "every_k": L + L // 2}
    counts = {}
    for policy, offload in RECOMPUTE:
        calls, flops, m = _training_step_counts(family, policy, offload)
        wrapped = [key for key, b in _blocks(m).items() if is_checkpointed(b)]
        assert len(wrapped) == {"none": 0, "every_k": L // 2}.get(policy, L), (policy, wrapped)
        assert calls == dict.fromkeys(SUBLAYERS[family], expected[policy]), (policy, offload, calls)
        counts[(policy, offload)] = flops
    base = counts[("none", False)]
    linears = [mod for mod in _blocks(_model(family))["0"].modules() if isinstance(mod, torch.nn.Linear)]
    block_fwd = 2 * 2 * 16 * sum(mod.in_features * mod.out_features for mod in linears)  # matmul FLOPs, batch 2 x 16
    d = FAMILIES[family]["n_embd"]
    # fairscale's offloading wrapper re-runs each whole block forward
    assert counts[("full", True)] - base == L * block_fwd
    # selective keeps every matmul output but attention's output projection's: that one matmul per block is redone
    assert counts[("selective", False)] - base == L * 2 * 2 * 16 * d * d
    # torch's full recomputation: a block's matmuls up to its last saved tensor, for every block or every second one
    full = counts[("full", False)] - base
    assert counts[("selective", False)] - base < full <= L * block_fwd
    assert counts[("every_k", False)] - base == full // L * (L // 2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainer_losses_equal_under_every_policy(tmp_path, corpus, cache_dir, family):
    arch = [] if family == "gpt" else ["model.family=llama", "model.bias=false", "model.n_head=4", "model.n_kv_head=2"]

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
                    *arch,
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
        assert all(is_checkpointed(b) for b in _blocks(tr.model).values()), extra  # the Trainer's engine applied it
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
    "2 ranks (gloo), gpt and llama: each policy under DDP and under FSDP2 fully_shard applied after it equals no AC."
    rows = torchrun_rows("ac_compose_worker.py")
    assert {(x["family"], x["wrapper"], x["policy"], x["offload"]) for x in rows} == {
        (f, w, p, o)
        for f in FAMILIES
        for w in ("ddp", "fsdp")
        for p, o in [("none", False), ("full", False), ("selective", False), ("every_k", False), ("full", True)]
    }
    for x in rows:
        assert x["loss_diff"] == 0.0 and x["grad_diff"] == 0.0 and x["keys_same"], x

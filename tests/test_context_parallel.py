"""Context parallelism (`parallel.cp`) equals one process: every sequence split over the cp ranks (head-tail load
balance), attention over the gathered keys and values, positions global. Each case trains a tiny gpt or llama for a
few steps on CPU/gloo; its per-step losses, gradient norms and final weights must match a one-process run of the same
global batch (the cp ranks of a data-parallel rank share its sequences). Composed with ddp, fsdp, hsdp, tensor
parallel (with sequence parallel), pipeline stages and activation checkpointing (whose recompute in backward gathers
again)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from test_layouts_3d import check_case  # the layouts' check: equal to one process, checkpoint, batch
from test_parallel import LLAMA, common, launched
from scaletrain.config import ConfigError, load_config
from scaletrain.context_parallel import ContextParallel, causal_attention, head_tail_index, positions

CP = ["parallel.cp=2"]
# name, overrides, data-parallel degree (the batch's split), expected engine name
CASES_2 = [
    ("gpt_cp", [*CP], 1, "ddp"),
    # compiled blocks and loss: dynamo traces the gathers, the head-tail order and the chunked causal masks
    ("llama_cp_compiled", [*LLAMA, *CP, "train.compile=true"], 1, "ddp"),
    ("llama_cp_fsdp", [*LLAMA, *CP, "parallel.strategy=fsdp"], 1, "fsdp"),
    # full checkpointing: the backward re-runs each block's forward, all-gathers included
    ("llama_cp_ac", [*LLAMA, *CP, "memory.activation_checkpointing=full", "train.grad_accum=2"], 1, "ddp"),
]
CASES_4 = [
    ("llama_fsdp_x_cp", [*LLAMA, *CP, "parallel.strategy=fsdp"], 2, "fsdp"),
    ("gpt_zero1_x_cp", [*CP, "parallel.strategy=zero1"], 2, "zero1"),
    ("llama_hsdp_x_cp", [*LLAMA, *CP, "parallel.strategy=hsdp", "parallel.dp_shard=1"], 2, "hsdp"),
    # the cp ranks average tensor-parallel (DTensor) gradients: FSDP2 over dp x cp does, as in torchtitan
    (
        "llama_tp_sp_x_cp",
        [*LLAMA, *CP, "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.strategy=fsdp"],
        1,
        "fsdp",
    ),
    ("gpt_pp_x_cp", [*CP, "parallel.pp=2", "model.tie_weights=false", "parallel.strategy=fsdp"], 1, "pp-1f1b+fsdp+cp"),
    ("llama_cp4", [*LLAMA, "parallel.cp=4"], 1, "ddp"),
]


two = launched(2, CASES_2, "two")


four = launched(4, CASES_4, "four")


@pytest.mark.parametrize("name,overrides,dp,engine", CASES_2, ids=[c[0] for c in CASES_2])
def test_two_process_context_parallel_equals_one_process(two, corpus, cache_dir, tmp_path, name, overrides, dp, engine):
    check_case(two, 2, corpus, cache_dir, tmp_path, name, overrides, dp, engine)


@pytest.mark.parametrize("name,overrides,dp,engine", CASES_4, ids=[c[0] for c in CASES_4])
def test_four_process_context_parallel_layouts_equal_one_process(
    four, corpus, cache_dir, tmp_path, name, overrides, dp, engine
):
    check_case(four, 4, corpus, cache_dir, tmp_path, name, overrides, dp, engine)


def test_head_tail_split_covers_every_position_once_and_balances_causal_work():
    T, n = 48, 3
    parts = [head_tail_index(T, n, r) for r in range(n)]
    assert sorted(torch.cat(parts).tolist()) == list(range(T))
    work = [int((p + 1).sum()) for p in parts]  # keys a causal query at position p attends to: p + 1
    assert len(set(work)) == 1, work


def test_attention_of_every_rank_equals_attention_over_the_whole_sequence():
    "One process plays each rank: its queries, the gathered keys in gather order, the mask of global positions."
    torch.manual_seed(0)
    B, H, KV, T, Q, n = 2, 4, 2, 24, 8, 3
    q, k, v = torch.randn(B, H, T, Q), torch.randn(B, KV, T, Q), torch.randn(B, KV, T, Q)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    order = torch.cat([head_tail_index(T, n, r) for r in range(n)])
    for r in range(n):
        cp = ContextParallel(group=None, size=n, rank=r)
        # the all-gather without processes: from the whole k (v), every rank's part in rank order
        cp.gather = lambda whole, dim=2: whole.index_select(dim, order)
        with cp:
            assert positions(T // n).tolist() == head_tail_index(T, n, r).tolist()
            y = causal_attention(cp.shard(q, 2), k, v, enable_gqa=True)
        torch.testing.assert_close(y, cp.shard(full, 2), rtol=1e-5, atol=1e-6)
    assert positions(4).tolist() == [0, 1, 2, 3]  # outside the context: the model's plain arange


@pytest.mark.parametrize(
    "overrides,world,match",
    [
        (["parallel.cp=2", "model.block_size=30"], 2, r"^parallel\.cp=2: model\.block_size=30 is not divisible by 2 x"),
        (["parallel.cp=3"], 2, r"^parallel: world size 2 is not divisible by .* x parallel\.cp = 1 x 1 x 3$"),
        (["parallel.cp=2", "parallel.backend=fairscale", "parallel.strategy=zero1"], 2, r"data parallelism only"),
    ],
)
def test_layouts_context_parallel_cannot_run_are_refused_in_one_line(overrides, world, match):
    from scaletrain.dist import ParallelDims

    with pytest.raises(ConfigError, match=match):
        ParallelDims.from_config(load_config(overrides=overrides), world)


def test_context_parallel_refusal_from_the_cli_exits_2_and_writes_nothing(tmp_path, corpus, cache_dir):
    out = tmp_path / "runs"
    r = run_cli(
        "train",
        "--nproc",
        "2",
        *common(corpus, cache_dir),
        f"run.out_dir={out}",
        "parallel.cp=2",
        "model.block_size=30",
    )
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "parallel.cp=2" in err[0] and "model.block_size=30" in err[0], r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_family_without_context_parallel_hooks_is_refused(tmp_path):
    "A user's own model (models.generic) attends its own way: cp cannot split it, and says so."
    import torch.nn as nn
    from scaletrain.models.generic import GenericSpec
    from scaletrain.parallel import check

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

        def forward(self, x):
            return self.blocks[0](x)

    cfg = load_config(overrides=["parallel.cp=2"])
    m = Tiny()
    with pytest.raises(ConfigError, match=r"^parallel\.cp=2 with a model of family .*: context parallelism needs"):
        check(cfg, 2, m, GenericSpec(m))


def test_a_classification_task_is_refused_with_context_parallelism():
    "A classifier reads each snippet's last token, which one cp rank holds: refused before any data is read."
    from scaletrain.finetune import make_task

    with pytest.raises(ConfigError, match=r"^parallel\.cp=2 with finetune\.task=stdlib-packages: a classification"):
        make_task(load_config(overrides=["parallel.cp=2"]))

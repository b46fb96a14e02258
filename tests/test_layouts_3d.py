"""The 3-D layouts `scaletrain plan` marks runnable really run, and equal one process: tensor x pipeline, FSDP2 (fsdp,
zero2, hsdp) x pipeline, hybrid sharding, zero2 x tp, and on 8 ranks fsdp x tp x pp, zero2 x tp x pp and
fsdp x tp x cp (fp32, CPU, gloo). Each case trains a tiny gpt or llama for a few steps; its per-step losses, gradient
norms and final weights must match a one-process run of the same global batch. One torchrun launch runs all
4-process cases, another the 8-process ones."""

import pytest
from test_parallel import (
    LLAMA,
    TIED_HEADS,
    assert_checkpoint_loads_in_one_process,
    assert_equivalent,
    common,
    launched,
    merged_weights,
    reference,
    results,
)
from scaletrain.config import load_config

PP = ["parallel.pp=2", "model.tie_weights=false"]
# name, overrides, data-parallel degree, expected engine name
CASES_4 = [
    ("tp_x_pp", [*PP, "parallel.tp=2"], 1, "pp-1f1b+tp"),
    ("llama_tp_sp_x_pp", [*LLAMA, *PP, "parallel.tp=2", "parallel.sequence_parallel=true"], 1, "pp-1f1b+tp"),
    # activation checkpointing after tensor parallelism, on each stage's own blocks (every other block)
    ("tp_x_pp_ac", [*PP, "parallel.tp=2", "memory.activation_checkpointing=every_k"], 1, "pp-1f1b+tp"),
    ("fsdp_x_pp", [*PP, "parallel.strategy=fsdp", "train.grad_accum=2", "train.micro_batch=4"], 2, "pp-1f1b+fsdp"),
    # two stages per rank: two FSDP2 roots on every rank
    (
        "fsdp_x_pp_interleaved",
        [*PP, "parallel.strategy=fsdp", "parallel.pp_schedule=interleaved1f1b"],
        2,
        "pp-interleaved1f1b+fsdp",
    ),
    ("llama_fsdp_x_pp", [*LLAMA, *PP, "parallel.strategy=fsdp"], 2, "pp-1f1b+fsdp"),
    ("zero2_x_pp_gpipe", [*PP, "parallel.strategy=zero2", "parallel.pp_schedule=gpipe"], 2, "pp-gpipe+zero2"),
    ("hsdp", ["parallel.strategy=hsdp", "parallel.dp_shard=2"], 4, "hsdp"),
    ("llama_hsdp", [*LLAMA, "parallel.strategy=hsdp", "parallel.dp_shard=2"], 4, "hsdp"),
    # torch's zero2 is FSDP2 without resharding: over tensor-parallel DTensors as fsdp is
    ("zero2_x_tp", ["parallel.strategy=zero2", "parallel.tp=2"], 2, "zero2"),
]
CASES_8 = [
    ("fsdp_x_tp_x_pp", [*PP, "parallel.strategy=fsdp", "parallel.tp=2"], 2, "pp-1f1b+fsdp+tp"),
    (
        "llama_hsdp_x_tp_x_pp",
        [*LLAMA, *PP, "parallel.strategy=hsdp", "parallel.dp_shard=1", "parallel.tp=2"],
        2,
        "pp-1f1b+hsdp+tp",
    ),
    ("zero2_x_tp_x_pp", [*PP, "parallel.strategy=zero2", "parallel.tp=2"], 2, "pp-1f1b+zero2+tp"),
    # 3-D with context parallelism: FSDP2 over dp x cp, tensor parallel inside (sequence parallel too)
    (
        "llama_fsdp_x_tp_x_cp",
        [*LLAMA, "parallel.strategy=fsdp", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.cp=2"],
        2,
        "fsdp",
    ),
]


four = launched(4, CASES_4, "four")


eight = launched(8, CASES_8, "eight")


def check_case(out, world, corpus, cache_dir, tmp_path, name, overrides, dp, engine):
    res = results(out, name, world)
    assert {r["engine"] for r in res} == {engine}, name
    ref_l, ref_w = reference(corpus, cache_dir, tmp_path, overrides, dp)
    # tensor and pipeline parallelism reorder partial sums (<= 1e-5 relative in fp32), as in test_parallel
    assert_equivalent(res, ref_l, ref_w, rtol=1e-5)
    cfg = load_config(overrides=common(corpus, cache_dir) + overrides)
    assert_checkpoint_loads_in_one_process(out, name, merged_weights(res), cfg.model.family)
    s = res[0]["summary"]
    assert s["world_size"] == world and s["dp"] == dp
    assert s["global_batch"] == dp * int(cfg.train.micro_batch) * cfg.train.grad_accum
    if cfg.train.compile:  # dynamo compiled the blocks on every rank, whole: no graph break fell back to eager
        assert all(r["compiled_frames"] > 0 and not r["graph_breaks"] for r in res), [
            (r["compiled_frames"], r["graph_breaks"]) for r in res
        ]


@pytest.mark.parametrize("name,overrides,dp,engine", CASES_4, ids=[c[0] for c in CASES_4])
def test_four_process_layouts_equal_one_process(four, corpus, cache_dir, tmp_path, name, overrides, dp, engine):
    check_case(four, 4, corpus, cache_dir, tmp_path, name, overrides, dp, engine)


@pytest.mark.parametrize("name,overrides,dp,engine", CASES_8, ids=[c[0] for c in CASES_8])
def test_eight_process_3d_layouts_equal_one_process(eight, corpus, cache_dir, tmp_path, name, overrides, dp, engine):
    check_case(eight, 8, corpus, cache_dir, tmp_path, name, overrides, dp, engine)


def test_sharded_stages_hold_a_share_of_the_stage(four):
    """fsdp x pp: the 4 ranks hold the model once between them (each stage sharded over its 2 data-parallel ranks);
    hsdp 2 x 2: twice (sharded over dp_shard=2, replicated over 2 groups), each rank a quarter or a half of it."""
    for name, copies, tied in (("fsdp_x_pp", 1, False), ("hsdp", 2, True)):
        res = results(four, name, 4)
        w = {
            k: v for k, v in merged_weights(res).items() if not (tied and k in TIED_HEADS)
        }  # a tied head is stored once
        whole = 4 * sum(v.numel() for v in w.values())  # fp32 bytes of the full model
        held = [r["param_bytes"] for r in res]
        assert abs(sum(held) / (copies * whole) - 1) < 0.01, (name, held, whole)
        assert all(abs(h / (copies * whole / 4) - 1) < 0.1 for h in held), (name, held, whole)

"""Loud, never silent: a strategy or trick that cannot apply to the model is refused before launch, in one line
(exit code 2 from the CLI), and nothing is written. Also: building a Trainer writes nothing and changes nothing of the
config it is given; the CLI and the Python API write the same config.yaml; a resume keeps its architecture."""

import copy
import json
import pytest
import torch
import torch.nn as nn
from conftest import run_cli, tiny
from scaletrain.config import load_config
from scaletrain.errors import ConfigError
from scaletrain.models.spec import build_model, get_spec
from scaletrain.parallel import check
from scaletrain.train import Trainer


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("scaletrain: error: ") and "Traceback" not in err, err
    return err


LLAMA = ["model.family=llama", "model.n_layer=2", "model.n_embd=32", "model.n_head=4", "model.block_size=32"]


@pytest.mark.parametrize(
    "args, expect",
    [
        (
            ["--nproc", "2", *LLAMA, "model.n_kv_head=1", "parallel.tp=2"],
            "model.n_kv_head=1 key/value heads are not divisible by parallel.tp=2",
        ),
        (
            ["--nproc", "2", *LLAMA, "model.ffn_dim=65", "parallel.tp=2"],
            "MLP width 65 (model.ffn_dim) is not divisible",
        ),
        ([*LLAMA, "model.n_kv_head=3"], "model.n_head=4 is not divisible by model.n_kv_head=3"),
        (["model.family=gpt", "model.n_kv_head=2"], "model.n_kv_head=2 has no effect on model.family=gpt"),
        (
            ["model.family=gpt", "model.rope_theta=500000"],
            "model.rope_theta=500000.0 has no effect on model.family=gpt",
        ),
        (["model.family=bert"], "model.family='bert': allowed: llama | gpt | hf"),
        (
            [*LLAMA, "memory.activation_checkpointing=every_k", "memory.ac_every=3"],
            "memory.ac_every=3 with activation_checkpointing=every_k checkpoints none of model.n_layer=2 blocks",
        ),
        (
            [
                "--nproc",
                "2",
                *LLAMA,
                "parallel.pp=2",
                "parallel.pp_schedule=interleaved1f1b",
                "model.tie_weights=false",
            ],
            "needs 4 pipeline stages, more than model.n_layer=2 blocks",
        ),
        (["run.loggers=wandb"], "run.loggers='wandb': allowed: jsonl | tensorboard"),
        (
            ["--nproc", "2", *LLAMA, "train.compile=true", "train.compile_scope=model", "parallel.strategy=fsdp"],
            "train.compile_scope=model with parallel.strategy=fsdp: its sharding wraps each block",
        ),
    ],
)
def test_refused_in_one_line_before_anything_starts(tmp_path, args, expect):
    r = run_cli("train", *args, f"run.out_dir={tmp_path}")
    assert expect in one_line_error(r)
    assert "launching" not in r.stdout and not any(tmp_path.iterdir())


def _foreign_blocks(model, spec):
    "The model with blocks that are not its family's (what a user's aliasing of the block container gives)."
    blocks = spec.block_modules(model)
    for k in blocks:
        blocks[k] = nn.Sequential(nn.Linear(32, 32))
    return model


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_the_model_itself_is_checked_not_the_config(family):
    "What only the model can tell: its real depth, whether the tensor-parallel plan finds its modules, what AC wraps."
    spec = get_spec(family)
    base = [f"model.family={family}", "model.n_layer=4", "model.n_embd=32", "model.n_head=4", "model.vocab_size=257"]
    shallow = build_model(load_config(overrides=base + ["model.n_layer=2"]).model)
    pp = load_config(
        overrides=base + ["parallel.pp=4", "model.tie_weights=false", "train.micro_batch=8", "train.eval_batch=8"]
    )
    with pytest.raises(
        ConfigError, match=r"needs 4 pipeline stages, more than the model's 2 \(model.n_layer=4\) blocks"
    ):
        check(pp, 4, shallow)
    ac = load_config(overrides=base + ["memory.activation_checkpointing=every_k", "memory.ac_every=3"])
    check(ac, 1)  # the config's 4 blocks: block 3 is wrapped
    with pytest.raises(ConfigError, match="wraps none of the model's 2 blocks"):
        check(ac, 1, shallow)
    tp = load_config(overrides=base + ["parallel.tp=2"])
    check(tp, 2)
    with pytest.raises(ConfigError, match="tensor-parallel plan names .* which block 0 does not have") as e:
        check(tp, 2, _foreign_blocks(build_model(tp.model), spec))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no non-empty ModuleDict"):
        check(tp, 2, _emptied(build_model(tp.model), spec))


def _emptied(model, spec):
    setattr(model, spec.block_container, nn.ModuleDict())
    return model


def test_a_model_of_another_family_is_refused_and_nothing_is_written(tmp_path, corpus, cache_dir):
    cfg = load_config(overrides=tiny(corpus, cache_dir, tmp_path, "model.family=llama"))
    gpt = build_model(load_config(overrides=tiny(corpus, cache_dir, tmp_path, "model.vocab_size=257")).model)
    with pytest.raises(ConfigError, match="model.family=llama, but the model given is of family gpt"):
        Trainer(cfg, model=gpt)
    cfg = load_config(
        overrides=tiny(
            corpus,
            cache_dir,
            tmp_path,
            "model.n_layer=4",
            "memory.activation_checkpointing=every_k",
            "memory.ac_every=3",
        )
    )
    shallow = build_model(load_config(overrides=tiny(corpus, cache_dir, tmp_path, "model.vocab_size=257")).model)
    with pytest.raises(ConfigError, match="wraps none of the model's 2 blocks"):
        Trainer(cfg, model=shallow)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_building_a_trainer_writes_nothing_and_leaves_the_config_alone(tmp_path, corpus, cache_dir):
    cfg = load_config(overrides=tiny(corpus, cache_dir, tmp_path / "runs", "run.name=r", "train.steps=2"))
    given = copy.deepcopy(cfg)
    t = Trainer(cfg)
    assert not (tmp_path / "runs").exists() and t.run_dir is None
    assert cfg == given and cfg.model.vocab_size == 0 and t.cfg.model.vocab_size == 257
    t.fit()
    assert cfg == given and (tmp_path / "runs" / "r" / "config.yaml").is_file()


def test_the_cli_and_the_python_api_write_the_same_config(tmp_path, corpus, cache_dir):
    "config.yaml holds the resolved config (the tokenizer's vocabulary, not 0), however the run was started."
    ov = tiny(corpus, cache_dir, tmp_path, "train.steps=2", "train.eval_every=0", "train.ckpt_every=0")
    assert run_cli("train", *ov, "run.name=cli").returncode == 0
    Trainer(load_config(overrides=ov + ["run.name=api"])).fit()
    cli, api = (tmp_path / "cli" / "config.yaml").read_text(), (tmp_path / "api" / "config.yaml").read_text()
    assert "vocab_size: 257" in cli and cli.replace("name: cli", "name: api") == api


def test_a_resume_keeps_its_architecture_and_says_what_changed(tmp_path, corpus, cache_dir):
    ov = tiny(corpus, cache_dir, tmp_path, "run.name=r", "train.steps=3", "train.ckpt_every=3")
    assert run_cli("train", *ov).returncode == 0
    run = tmp_path / "r"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for bad, key in (
        ("model.n_layer=1", "model.n_layer"),
        ("model.bias=false", "model.bias"),
        ("model.family=llama", "model.family"),
    ):
        err = one_line_error(run_cli("train", "--resume", run, bad))
        assert f"checkpoint was trained with {key}=" in err and "keeps its architecture" in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # config.yaml and metrics untouched
    r = run_cli("train", "--resume", run, "train.steps=5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "changed since the checkpoint: train.steps 3 -> 5" in r.stdout + r.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 5 and load_config(run / "config.yaml").train.steps == 5


def test_trainer_resume_refuses_a_checkpoint_of_another_architecture(tmp_path, corpus, cache_dir):
    "The Python API checks too: a checkpoint's recorded config against the config it is resumed with."
    ov = tiny(corpus, cache_dir, tmp_path, "run.name=r", "train.steps=2", "train.ckpt_every=2")
    Trainer(load_config(overrides=ov)).fit()
    with pytest.raises(ConfigError, match="keeps its architecture"):
        Trainer(
            load_config(tmp_path / "r" / "config.yaml", ["model.n_embd=64", "model.n_head=2"]),
            run_dir=tmp_path / "r",
            resume=True,
        )
    assert (
        torch.load(tmp_path / "r" / "checkpoints" / "step_00000002" / "trainer_state.pt", weights_only=True)["step"]
        == 2
    )

"Shared pieces of the fine-tuning, sweep and compression tests: a labelled folder and a tiny pretrained checkpoint."

from pathlib import Path
import pytest
from conftest import tiny

WORDS = {
    "cats": "the cat says meow and purrs; whiskers twitch. ",
    "dogs": "the dog says woof and barks; fetch the ball. ",
    "birds": "the bird says tweet and sings; wings flap. ",
}


def make_pets(root: Path, files: int = 6) -> Path:
    "A folder dataset root/<label>/<i>.txt, three classes with distinct words."
    for label, w in WORDS.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(files):
            (root / label / f"{i}.txt").write_text((w + f"{i} ") * (8 + i))
    return root


def ft_overrides(out_dir, init, task, cache_dir, *extra):
    "A short fine-tuning run of the tiny model on the pets folder."
    return [
        f"finetune.init={init}",
        f"finetune.task={task}",
        f"data.cache_dir={cache_dir}",
        f"run.out_dir={out_dir}",
        "train.device=cpu",
        "finetune.snippet_tokens=24",
        "finetune.val_fraction=0.2",
        "finetune.test_fraction=0.2",
        "train.micro_batch=8",
        "train.eval_batch=16",
        "train.steps=6",
        "train.warmup_steps=1",
        "train.eval_every=3",
        "train.ckpt_every=0",
        "train.lr=3e-3",
        *extra,
    ]


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    return make_pets(tmp_path_factory.mktemp("pets"))


@pytest.fixture(scope="module")
def pretrained(corpus, cache_dir, tmp_path_factory):
    "Run folder of a 6-step pretraining of the 2-layer model on the tiny corpus."
    from scaletrain.config import load_config
    from scaletrain.train import Trainer

    out = tmp_path_factory.mktemp("pre")
    s = Trainer(load_config(overrides=tiny(corpus, cache_dir, out, "run.name=pre")), default_callbacks=False).fit()
    assert s["status"] == "finished"
    return Path(s["run_dir"])


LLAMA = ("model.family=llama", "model.bias=false", "model.n_kv_head=1")  # the default family, grouped-query attention


@pytest.fixture(scope="module")
def pretrained_llama(corpus, cache_dir, tmp_path_factory):
    "Run folder of a 6-step pretraining of a 2-layer llama (one key/value head) on the tiny corpus."
    from scaletrain.config import load_config
    from scaletrain.train import Trainer

    out = tmp_path_factory.mktemp("pre_llama")
    s = Trainer(
        load_config(overrides=tiny(corpus, cache_dir, out, "run.name=pre", *LLAMA)), default_callbacks=False
    ).fit()
    assert s["status"] == "finished"
    return Path(s["run_dir"])


def live_copy(run: Path, tmp_path: Path) -> Path:
    "A copy of the pretraining run `run` that a test may prune, as if it still trained."
    import shutil

    shutil.copytree(run, tmp_path / "live")
    return tmp_path / "live"


def live_save(run: Path, keep: int = 1) -> Path:
    """What a pretraining run that trains on does at its next save: a newer checkpoint (a copy of the newest, so it
    loads), `latest` moved to it, older ones pruned to `keep`. Returns the new checkpoint folder."""
    import shutil
    from scaletrain import checkpoint as ckpt

    ck = run / "checkpoints"
    old = ckpt.latest_checkpoint(run)
    new = ck / ckpt.step_name(ckpt.checkpoint_step(old.name, "step") + 3)
    shutil.copytree(old, new)
    (ck / "latest").write_text(new.name)
    ckpt.prune(ck, new, keep=keep)
    return new

"Task datasets: the stdlib-packages task split by file, user data formats, sampling, and bad data as one line."

import json
from pathlib import Path
import numpy as np
import pytest
import torch
from conftest import run_cli
from ft_helpers import make_pets, pretrained  # noqa: F401 (fixture)
from scaletrain.config import load_config
from scaletrain.data import DataError
from scaletrain.tasks import (
    ClassificationTask,
    load_units,
    split_units,
    stdlib_packages,
    folder_units,
    build_classification_data,
    PackageLMTask,
    SPLITS,
)


def test_stdlib_packages_split_by_file_every_class_everywhere():
    f = load_config(overrides=["finetune.n_classes=6"]).finetune
    units = load_units(f)
    assert sorted({u.label for u in units}) == sorted(list(stdlib_packages())[:6])
    assert not any(u.uid.startswith("test/") or "/tests/" in u.uid for u in units)  # test suites are left out
    parts = split_units(units, f.val_fraction, f.test_fraction)
    ids = {s: {u.uid for u in parts[s]} for s in SPLITS}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert sum(len(v) for v in ids.values()) == len(units)
    for s in SPLITS:
        assert {u.label for u in parts[s]} == {u.label for u in units}
    assert split_units(units, f.val_fraction, f.test_fraction) == parts  # deterministic


def test_snippets_caps_and_labels(tmp_path):
    cfg = load_config(
        overrides=[
            "finetune.n_classes=3",
            "finetune.snippet_tokens=32",
            "finetune.max_per_class=50",
            "finetune.eval_per_class=20",
        ]
    )
    t = ClassificationTask(cfg)
    assert t.resolved(cfg).finetune.labels == ",".join(t.labels) and len(t.labels) == 3
    for s in SPLITS:
        assert t.data.x[s].shape[1] == 32
        counts = np.bincount(t.data.y[s], minlength=3)
        assert (counts <= (50 if s == "train" else 20)).all() and (counts > 0).all()


def test_user_folder_presplit_and_jsonl_agree(tmp_path):
    make_pets(tmp_path / "flat")
    for split, n in (("train", 4), ("val", 2)):
        make_pets(tmp_path / "pre" / split, files=n)
    recs = [dict(text=p.read_text(), label=p.parent.name) for p in sorted((tmp_path / "flat").rglob("*.txt"))]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    f = lambda task: (
        load_config(overrides=[f"finetune.task={task}", "finetune.snippet_tokens=16", "model.block_size=32"]).finetune
    )
    from scaletrain.data import ByteTokenizer

    a = build_classification_data(f(tmp_path / "flat"), ByteTokenizer())
    b = build_classification_data(f(tmp_path / "d.jsonl"), ByteTokenizer())
    assert a.labels == b.labels == ["birds", "cats", "dogs"]
    assert sum(len(a.y[s]) for s in a.y) == sum(len(b.y[s]) for s in b.y)  # the same snippets, in whatever split
    pre = split_units(folder_units(tmp_path / "pre"), 0.2, 0.2)
    assert len(pre["train"]) == 12 and len(pre["val"]) == 6 and not pre["test"]


def test_batches_are_deterministic_and_rank_disjoint(tmp_path):
    make_pets(tmp_path / "pets")
    t = ClassificationTask(
        load_config(
            overrides=[f"finetune.task={tmp_path / 'pets'}", "finetune.snippet_tokens=16", "model.block_size=32"]
        )
    )
    t.setup(global_batch=6, eval_batch=6)
    x, y = t.train_batch(3)
    parts = [t.train_batch(3, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    t2 = ClassificationTask(
        load_config(
            overrides=[f"finetune.task={tmp_path / 'pets'}", "finetune.snippet_tokens=16", "model.block_size=32"]
        )
    )
    t2.setup(6, 6)
    assert torch.equal(t2.train_batch(3)[0], x) and not torch.equal(t2.train_batch(4)[0], x)


def test_package_lm_task_uses_one_family():
    t = PackageLMTask(load_config(overrides=["finetune.task=lm:json", "model.block_size=32"]))
    total = sum(len(a) for a in t.data.train + t.data.val)
    import sysconfig

    src = sum(len(p.read_bytes()) + 1 for p in (Path(sysconfig.get_paths()["stdlib"]) / "json").rglob("*.py"))
    assert total == src and t.data.files["train"] > 0 and t.data.files["val"] > 0


def _one_line(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("scaletrain: error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_bad_datasets_are_one_line(tmp_path, pretrained):
    (tmp_path / "one" / "only").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "one" / "only" / f"{i}.txt").write_text("x" * 80)
    (tmp_path / "few" / "a").mkdir(parents=True)
    (tmp_path / "few" / "b").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "few" / "a" / f"{i}.txt").write_text("a" * 80)
    (tmp_path / "few" / "b" / "0.txt").write_text("b" * 80)
    (tmp_path / "unseen.jsonl").write_text(
        "".join(
            json.dumps(dict(text="t" * 40, label=l, split=s)) + "\n"
            for l, s in (("a", "train"), ("b", "train"), ("c", "val"))
        )
    )
    (tmp_path / "noval.jsonl").write_text(
        "".join(json.dumps(dict(text="t" * 40, label=l, split="train")) + "\n" for l in "ab")
    )
    out = tmp_path / "runs"
    base = [f"finetune.init={pretrained}", f"run.out_dir={out}", "train.device=cpu", "finetune.snippet_tokens=24"]
    cases = {
        tmp_path / "one": "one class (only)",
        tmp_path / "few": "label 'b' has 1 file",
        tmp_path / "unseen.jsonl": "label 'c' is in the val split but was not seen in training",
        tmp_path / "noval.jsonl": "the val split is empty",
        tmp_path / "nope": "not found",
    }
    from scaletrain.finetune import prepare

    for task, want in cases.items():
        with pytest.raises(DataError) as e:
            prepare(load_config(overrides=base + [f"finetune.task={task}"]))
        assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
    # through the command line: one line, exit code 2, no run folder
    msg = _one_line(run_cli("finetune", *base, f"finetune.task={tmp_path / 'unseen.jsonl'}"))
    assert "label 'c' is in the val split but was not seen in training" in msg
    assert not out.exists() or not any(out.iterdir())


def test_pretraining_corpus_leaves_out_held_out_files(tmp_path):
    from scaletrain.tasks import pretraining_corpus, held_out_files
    from scaletrain.data import stdlib_files, folder_files

    f = load_config(overrides=["finetune.n_classes=4"]).finetune
    held = held_out_files(f)
    out = pretraining_corpus(f, tmp_path / "c")
    linked = {p.resolve() for p in folder_files(out)}
    assert held and not (linked & {p.resolve() for p in held})
    assert len(linked) == len(stdlib_files()) - len(held)
    # the same folder for a task with other held-out files: none of those may stay linked
    f2 = load_config(overrides=["finetune.n_classes=4", "finetune.val_fraction=0.3"]).finetune
    held2 = held_out_files(f2)
    assert held2 != held
    linked2 = {p.resolve() for p in folder_files(pretraining_corpus(f2, out))}
    assert not (linked2 & {p.resolve() for p in held2}) and len(linked2) == len(stdlib_files()) - len(held2)


def test_tasks_leave_the_config_unchanged(tmp_path):
    "Building a task, resolving and building its model read the config they are given; what they fill in is in a copy."
    import copy
    from scaletrain.models.heads import PooledHead
    from scaletrain.models.spec import spec_for

    make_pets(tmp_path / "pets")
    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32"]
    for over, kind in (
        ([f"finetune.task={tmp_path / 'pets'}", "finetune.snippet_tokens=16"], ClassificationTask),
        (["finetune.task=lm:json"], PackageLMTask),
    ):
        cfg = load_config(overrides=over + tiny)
        before = copy.deepcopy(cfg)
        t = kind(cfg)
        rc = t.resolved(cfg)
        model = t.build_model(rc)
        t.flops_per_token(rc, model)
        assert cfg == before, kind.__name__
        assert rc.model.vocab_size == 257 and cfg.model.vocab_size == 0 and spec_for(model).name == "llama"
        if kind is ClassificationTask:
            assert rc.finetune.labels == "birds,cats,dogs" and cfg.finetune.labels == ""
            assert isinstance(spec_for(model).get_head(model), PooledHead)

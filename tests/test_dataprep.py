"`scaletrain data prepare` and `data label`: duplicates, rules, mixture, contamination, resume, refusals, labels."

import json
from pathlib import Path
import numpy as np
import pytest
from conftest import run_cli
from ft_helpers import ft_overrides, pets, pretrained  # noqa: F401 (fixtures)
from scaletrain import dataprep
from scaletrain.config import load_config, prep_config
from scaletrain.data import is_val_file, parse_sources, prepare_data
from scaletrain.dataprep import ngram_hashes, prepare, word_hashes

VOCAB = [f"w{i}" for i in range(5000)]


def words(rng, n=300):
    return list(rng.choice(VOCAB, n))


def jaccard(a: str, b: str, k: int = 5) -> float:
    "The true Jaccard similarity of the word 5-gram sets (what the MinHash estimates)."
    sa, sb = (set(ngram_hashes(word_hashes(t), k).tolist()) for t in (a, b))
    return len(sa & sb) / len(sa | sb)


def tn(stem: str, suffix: str = ".txt") -> str:
    "A file name the validation split (data.val_fraction=0.001) does not hold out."
    while is_val_file(stem + suffix, 0.001):
        stem += "_"
    return stem + suffix


def fates(ds: Path) -> dict:
    return {r["id"].split(":", 1)[1]: r for r in map(json.loads, open(ds / "fates.jsonl"))}


def run(src, tmp_path, *prep, val_fraction=0.001, held_out=None, name="datasets"):
    cfg = load_config(overrides=[f"data.source={src}", f"data.val_fraction={val_fraction}"])
    return prepare(
        cfg, prep_config(["prep.workers=1", *prep]), out=tmp_path / name, held_out=held_out, show_progress=False
    )


def test_exact_and_near_duplicates_precision_recall(tmp_path):
    "Known duplicates: exact copies (case/space changed), near copies (J >= 0.85) and far edits (J < 0.5)."
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    bases = [words(rng) for _ in range(40)]
    for i, b in enumerate(bases):
        (src / tn(f"a{i:03d}")).write_text(" ".join(b))
    truth = {}
    for i in range(10):  # exact: the same words, other case and spacing
        (src / tn(f"b_exact{i}")).write_text("  " + "\n".join(bases[i]).upper())
        truth[tn(f"b_exact{i}")] = "duplicate"
    for i in range(10, 25):  # near: 1 or 2 words of 300 changed
        w = list(bases[i])
        for j in rng.choice(300, 1 + i % 2, replace=False):
            w[j] = "edited"
        (src / tn(f"c_near{i}")).write_text(" ".join(w))
        truth[tn(f"c_near{i}")] = "near_duplicate"
    for i in range(25, 40):  # far: every third word changed
        w = [x if j % 3 else f"x{j}" for j, x in enumerate(bases[i])]
        (src / tn(f"d_far{i}")).write_text(" ".join(w))
        truth[tn(f"d_far{i}")] = "kept"
    for f, t in truth.items():  # the constructed labels agree with the true Jaccard at the 0.8 threshold
        j = jaccard((src / f).read_text(), " ".join(bases[int("".join(c for c in f if c.isdigit()))]))
        assert (j >= 0.85) if t != "kept" else (j < 0.5), (f, j)
    fa = fates(run(src, tmp_path, "prep.near_threshold=0.8"))
    assert all(fa[tn(f"a{i:03d}")]["fate"] == "kept" for i in range(40))
    flagged = {f for f, r in fa.items() if r["fate"] in ("duplicate", "near_duplicate")}
    true_dups = {f for f, t in truth.items() if t != "kept"}
    precision = len(flagged & true_dups) / max(1, len(flagged))
    recall = len(flagged & true_dups) / len(true_dups)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert all(fa[f]["fate"] == "duplicate" for f in truth if f.startswith("b_"))
    assert all(fa[f]["of"] == f"src:{tn(f'a{int(f[6:8]):03d}')}" for f in truth if f.startswith("c_") and f in flagged)
    st = json.loads((run(src, tmp_path, "prep.near_threshold=0.8") / "stats.json").read_text())
    assert st["stages"]["exact"][0][0] == 80 - 10 and st["stages"]["near"][0][0] == 80 - 25


GOOD = "def f(x):\n    return x + 1\n" + "\n".join(f"value_{i} = compute({i}, 'item {i}')" for i in range(30)) + "\n"
BAD = {
    "length": ("x = 1\n", ["prep.min_chars=64"]),
    "binary": ("header\0\1\2 binary payload " * 10, []),
    "repeated_lines": ("print('spam spam spam')\n" * 30 + "x = 1\n", []),
    "repeated_chars": ("#" * 400 + "\nx = 1\n", []),
    "generated": ("# This file was automatically generated. DO NOT EDIT.\n" + GOOD, []),
    "licence": (
        "# Permission is hereby granted, free of charge, to any person obtaining a copy of this software and\n"
        "# associated documentation files (the Software), to deal in the Software without restriction, including\n"
        "# without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell\n"
        "# THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.\n\nx = 1\n",
        [],
    ),
}


@pytest.mark.parametrize("rule", list(BAD))
def test_each_filter_rule_drops_its_documents_and_only_when_named(tmp_path, rule):
    text, extra = BAD[rule]
    src = tmp_path / "src"
    src.mkdir()
    good, bad = tn("good", ".py"), tn("bad", ".py")
    (src / good).write_text(GOOD)
    (src / bad).write_bytes(text.encode())
    fa = fates(run(src, tmp_path, *extra))
    assert fa[good]["fate"] == "kept"
    assert fa[bad]["fate"] == "dropped" and fa[bad]["rule"] == rule, fa[bad]
    others = ",".join(r for r in dataprep.RULES if r != rule)
    assert fates(run(src, tmp_path, f"prep.rules={others}", *extra, name="without"))[bad]["fate"] == "kept"


def test_fates_are_undone_by_keep_ids(tmp_path):
    "A document listed in prep.keep_ids is kept whatever a rule or the deduplication says, and marked forced."
    src = tmp_path / "src"
    src.mkdir()
    good, dup, small = tn("good", ".py"), tn("zdup", ".py"), tn("small", ".py")
    (src / good).write_text(GOOD)
    (src / dup).write_text(GOOD.upper())
    (src / small).write_text("x = 1\n")
    fa = fates(run(src, tmp_path))
    assert fa[dup]["fate"] == "duplicate" and fa[small]["rule"] == "length"
    ids = tmp_path / "keep.txt"
    ids.write_text(f"src:{dup}\nsrc:{small}\n")
    ds = run(src, tmp_path, f"prep.keep_ids={ids}", name="undone")
    fb = fates(ds)
    assert all(fb[f]["fate"] == "kept" for f in (good, dup, small)) and fb[dup]["forced"] and fb[small]["forced"]
    assert run(src, tmp_path, f"prep.keep_ids={ids}", name="undone") == ds  # the same job again: the same folder


def test_mixture_hits_target_tokens_within_one_percent_and_trains(tmp_path):
    rng = np.random.default_rng(2)
    a, b = tmp_path / "a", tmp_path / "b"
    for d, n, size in ((a, 300, 40), (b, 120, 60)):
        d.mkdir()
        for i in range(n):
            (d / f"{d.name}{i}.txt").write_text(" ".join(words(rng, int(size + rng.integers(0, size)))))
    total = 150_000
    ds = run(f"{a}:0.3,{b}:0.7", tmp_path, f"prep.mix_tokens={total}", "prep.shard_mb=1", val_fraction=0.05)
    man = json.loads((ds / "manifest.json").read_text())
    got = {"a": 0, "b": 0}
    for s in man["shards"]["train"]:
        for r in map(json.loads, open(ds / s)):
            got[r["source"]] += len(r["text"].encode())  # the byte tokenizer: one token per byte
    for name, share in (("a", 0.3), ("b", 0.7)):
        assert abs(got[name] - share * total) <= 0.01 * share * total, (name, got)
    mix = {m["source"]: m for m in man["mixture"]}
    assert mix["b"]["epochs"] > 1 > mix["a"]["epochs"]  # b is up-sampled, a down-sampled: both stated
    assert mix["a"]["tokens"] == got["a"] and abs(mix["b"]["share"] - 0.7) < 0.01
    # the data layer reads the folder as it is: the shards, and its own held-out split
    (src,) = parse_sources(str(ds))
    assert src.val == {ds / v for v in man["shards"]["val"]} and len(src.files) == len(man["shards"]["train"]) + 1
    cfg = load_config(overrides=[f"data.source={ds}", f"data.cache_dir={tmp_path / 'cache'}"])
    pd = prepare_data(cfg.data, show_progress=False)
    val_text = sum(len(json.loads(x)["text"].encode()) + 1 for v in man["shards"]["val"] for x in open(ds / v))
    assert len(pd.train[0]) == sum(got.values()) + sum(1 for s in man["shards"]["train"] for _ in open(ds / s))
    assert len(pd.val[0]) == val_text


def test_contamination_found_when_planted_and_not_when_absent(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    src.mkdir()
    names = [f"f{i}.txt" for i in range(40)]
    for n in names:
        (src / n).write_text(" ".join(words(rng)))
    val = [n for n in names if is_val_file(n, 0.2)]
    train = [n for n in names if n not in val]
    assert val and train
    clean = run(src, tmp_path, val_fraction=0.2, name="clean")
    assert json.loads((clean / "stats.json").read_text())["contamination"] == [dict(docs=0, ngrams=0)]
    passage = " ".join((src / val[0]).read_text().split()[50:80])  # 30 words of a held-out file
    task_text = " ".join(words(rng, 40))
    with open(src / train[0], "a") as fh:
        fh.write(" " + passage)
    with open(src / train[1], "a") as fh:
        fh.write(" " + task_text)
    held = {"task": [task_text]}
    rep = run(src, tmp_path, val_fraction=0.2, held_out=held, name="reported")
    st = json.loads((rep / "stats.json").read_text())
    assert st["targets"] == ["validation", "task"]
    assert st["contamination"][0]["docs"] == 1 and st["contamination"][0]["ngrams"] == 30 - 13 + 1
    assert st["contamination"][1]["docs"] == 1
    assert fates(rep)[train[0]]["fate"] == "kept"  # reported only
    removed = fates(run(src, tmp_path, "prep.decontaminate=true", val_fraction=0.2, held_out=held, name="removed"))
    assert removed[train[0]]["rule"] == removed[train[1]]["rule"] == "contamination"
    assert sum(r["fate"] == "kept" for r in removed.values()) == len(train) - 2


def test_interrupted_prepare_resumes_to_the_same_hash(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i:02d}.txt").write_text(" ".join(words(rng, 100)))
    (src / "dup.txt").write_text((src / "f03.txt").read_text())
    whole = run(src, tmp_path, "prep.chunk_files=3", name="whole")
    real, calls = dataprep.process_unit, []

    def dies_after_four(job):
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        calls.append(job["index"])
        return real(job)

    monkeypatch.setattr(dataprep, "process_unit", dies_after_four)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path, "prep.chunk_files=3", name="resumed")
    (work,) = [d for d in (tmp_path / "resumed").glob(".work-*") if d.is_dir()]
    assert len(list((work / "chunks").iterdir())) == 4
    monkeypatch.setattr(dataprep, "process_unit", lambda job: calls.append(job["index"]) or real(job))
    again = run(src, tmp_path, "prep.chunk_files=3", name="resumed")
    assert calls[4:] == list(range(4, 11))  # only the units not yet done
    assert again.name == whole.name
    assert (
        json.loads((again / "manifest.json").read_text())["hash"]
        == json.loads((whole / "manifest.json").read_text())["hash"]
    )
    assert not [d for d in (tmp_path / "resumed").glob(".work-*") if d.is_dir()]  # the work folder is gone


@pytest.mark.parametrize(
    "bad,says",
    [
        ("prep.rules=length,lenght", "unknown rule 'lenght' (did you mean 'length'?)"),
        ("prep.near_threshold=1.5", "prep.near_threshold=1.5: must be <= 1.0"),
        ("prep.max_top_char=-0.1", "prep.max_top_char=-0.1: must be >= 0.0"),
        ("prep.min_chars=ten", "prep.min_chars='ten': expected a whole number"),
        ("prep.nearthreshold=0.5", "unknown key 'prep.nearthreshold' (did you mean 'prep.near_threshold'?)"),
        # a training key is not the dataset's: refused by name, not checked against train.steps' default
        ("train.warmup_steps=300", "data prepare: train.warmup_steps: only data.* and prep.* overrides apply"),
        ("prep.tasks=no-such-task", "prep.tasks='no-such-task': not found"),
    ],
)
def test_bad_rules_and_thresholds_are_one_line_exit_2(tmp_path, corpus, bad, says):
    out = tmp_path / "ds"
    r = run_cli("data", "prepare", str(corpus), bad, "--out", str(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], r.stderr
    assert not out.exists()


def test_cli_prepare_writes_a_folder_train_reads(tmp_path, corpus):
    out = tmp_path / "ds"
    r = run_cli(
        "data",
        "prepare",
        str(corpus),
        "data.val_fraction=0.2",
        "prep.rules=length,binary",
        "--out",
        str(out),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    (ds,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert str(ds) in r.stdout
    # what stays beside it: the record that this job is done (a rerun finds it), no lock and no work folder
    assert [p.name.split("-")[0] for p in out.iterdir() if p.name.startswith(".")] == [".done"]
    for f in ("manifest.json", "fates.jsonl", "stats.json", "report.html", "stages.png", "lengths.png"):
        assert (ds / f).is_file(), f
    html = (ds / "report.html").read_text()
    assert "Contamination" in html and "Mixture" in html


def test_label_with_a_tiny_classifier_then_filter_and_balance(tmp_path, pets, pretrained, cache_dir):
    from scaletrain.finetune import finetune
    from scaletrain.label import label_corpus

    s = finetune(load_config(overrides=ft_overrides(tmp_path / "ft", pretrained, pets, cache_dir, "run.name=ft")))
    cfg = load_config(overrides=[f"data.source={pets}", "data.val_fraction=0.001"])
    labels = label_corpus(s["run_dir"], cfg, out=tmp_path / "labels.jsonl", show_progress=False)
    rows = [json.loads(x) for x in open(labels)]
    ids = [i for i, _ in dataprep.corpus_documents(cfg)]
    assert [r["id"] for r in rows] == ids and len(ids) == 18
    assert all(r["label"] in ("birds", "cats", "dogs") and 0 < r["confidence"] <= 1 for r in rows)
    acc = np.mean([r["label"] == r["id"].split(":")[1].split("/")[0] for r in rows])
    print(f"label accuracy {acc:.2f}")
    keep = rows[0]["label"]
    ds = run(pets, tmp_path, f"prep.labels={labels}", f"prep.keep_labels={keep}")
    kept = [r for r in fates(ds).values() if r["fate"] == "kept"]
    assert kept and all(r["label"] == keep for r in kept)
    assert len(kept) == sum(r["label"] == keep for r in rows)
    high = sorted(r["confidence"] for r in rows)[len(rows) // 2]
    ds = run(pets, tmp_path, f"prep.labels={labels}", f"prep.min_confidence={high}", name="confident")
    assert all(r["confidence"] >= high for r in fates(ds).values() if r["fate"] == "kept")
    ds = run(pets, tmp_path, f"prep.labels={labels}", "prep.balance_labels=true", name="balanced")
    st = json.loads((ds / "stats.json").read_text())
    assert set(st["label_counts"]) == {r["label"] for r in rows}
    r = run_cli("data", "label", str(tmp_path / "nope"), str(pets))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    # labels already written are not replaced without --force; only data.* overrides apply
    before = labels.read_bytes()
    for extra, line in (
        ([], f"data label: --out={labels}: exists; choose another path or pass --force"),
        (["train.steps=3"], "data label: train.steps: only data.* overrides apply"),
    ):
        r = run_cli("data", "label", s["run_dir"], pets, "--out", labels, "--quiet", *extra)
        assert r.returncode == 2 and r.stderr.strip().startswith(f"scaletrain: error: {line}"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and labels.read_bytes() == before
    r = run_cli("data", "label", s["run_dir"], pets, "--out", labels, "--quiet", "--force", "data.val_fraction=0.001")
    assert r.returncode == 0 and [json.loads(x) for x in labels.read_text().splitlines()] == rows, r.stderr

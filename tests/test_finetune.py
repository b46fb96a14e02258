"""Fine-tuning: the run folder, loading an FSDP checkpoint, frozen blocks, lr groups, early stopping, bad checkpoints,
a pretraining run that trains on."""

import copy
import json
from pathlib import Path
import pytest
import torch
from conftest import run_cli, tiny
from ft_helpers import ft_overrides, live_copy, live_save, pets, pretrained, pretrained_llama  # noqa: F401 (fixtures)
from scaletrain.config import ConfigError, load_config
from scaletrain.metrics import read_metrics
from scaletrain.models.gpt import GPT
from scaletrain.models.llama import Llama
from scaletrain.models.spec import build_model, spec_for
from scaletrain import checkpoint as ckpt
from scaletrain.finetune import finetune, finetune_param_groups, load_classifier, best_checkpoint, prepare
from scaletrain.models.heads import PooledHead, build_classifier
from scaletrain.train import Callback


def _pretrained_params(run):
    m = GPT(ckpt.checkpoint_config(run).model)
    ckpt.load_model_weights(run, m)
    return dict(m.named_parameters())


def test_cli_finetune_writes_run_folder(tmp_path, pets, pretrained, cache_dir):
    r = run_cli("finetune", *ft_overrides(tmp_path, pretrained, pets, cache_dir, "run.name=ft"))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "ft"
    assert {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "loss.png",
        "confusion.png",
        "confusion.json",
        "checkpoints",
    } <= {p.name for p in run.iterdir()}
    evals = [x for x in read_metrics(run / "metrics.jsonl") if "val_loss" in x]
    assert [e["step"] for e in evals] == [0, 3, 6] and all(
        0 <= e["accuracy"] <= 1 and 0 <= e["macro_f1"] <= 1 for e in evals
    )
    s = json.loads((run / "summary.json").read_text())
    best = max(evals, key=lambda e: e["accuracy"])  # the first of the best is kept
    assert s["best_step"] == min(e["step"] for e in evals if e["accuracy"] == best["accuracy"])
    assert (
        abs(s["val_accuracy"] - best["accuracy"]) < 1e-6
    )  # re-evaluating the best checkpoint gives its number back (log rounds to 6 places)
    assert s["labels"] == ["birds", "cats", "dogs"] and 0 <= s["test_accuracy"] <= 1
    assert best_checkpoint(run).name == f"best_{s['best_step']:08d}"
    assert load_config(run / "config.yaml").finetune.labels == "birds,cats,dogs"
    # init named a run folder: the config records the very checkpoint every rank loaded (that run may train on)
    assert load_config(run / "config.yaml").finetune.init == str(ckpt.latest_checkpoint(pretrained))
    assert "val accuracy" in r.stdout and "run folder" in r.stdout
    # `scaletrain export` writes plain GPTs; a classifier's run says which command exports it
    r = run_cli("export", run, tmp_path / "ft.safetensors")
    assert r.returncode == 2 and "scaletrain compress" in r.stderr and not (tmp_path / "ft.safetensors").exists(), (
        r.stderr
    )


def test_frozen_blocks_do_not_change_and_body_lr_is_scaled(tmp_path, pets, pretrained, cache_dir):
    seen = []

    class Lrs(Callback):
        def after_step(self):
            seen.append({g["name"]: g["lr"] for g in self.trainer.engine.optimizer.param_groups})

    cfg = load_config(
        overrides=ft_overrides(
            tmp_path,
            pretrained,
            pets,
            cache_dir,
            "finetune.freeze_blocks=1",
            "finetune.body_lr_scale=0.25",
            "train.eval_every=0",
        )
    )
    s = finetune(cfg, callbacks=[Lrs()])
    assert s["status"] == "finished"
    ft, _ = load_classifier(Path(s["run_dir"]) / "checkpoints" / "step_00000006")
    P = _pretrained_params(pretrained)
    frozen = [n for n, _ in ft.named_parameters() if n.startswith(("wte.", "wpe.", "blocks.0."))]
    assert len(frozen) > 10
    for n, p in ft.named_parameters():
        if n in frozen:
            assert torch.equal(p, P[n]), f"frozen {n} changed"
        elif n in P and p.dim() == 2:
            assert not torch.equal(p, P[n]), f"trainable {n} did not change"
    for lrs in seen:
        assert abs(lrs["body"] - 0.25 * lrs["head"]) < 1e-12 and abs(lrs["body_no_decay"] - 0.25 * lrs["head"]) < 1e-12
    n_body = sum(p.numel() for n, p in ft.named_parameters() if n not in frozen)
    assert s["trainable_params"] == n_body


def test_early_stopping_keeps_best(tmp_path, pets, pretrained, cache_dir):
    # lr 0: the metric cannot improve, so one evaluation without improvement stops the run (after the next step)
    cfg = load_config(
        overrides=ft_overrides(
            tmp_path,
            pretrained,
            pets,
            cache_dir,
            "train.lr=0",
            "train.steps=20",
            "train.eval_every=2",
            "finetune.patience=1",
            "finetune.metric=macro_f1",
        )
    )
    s = finetune(cfg)
    assert s["status"] == "early_stopped" and s["early_stopped"] and s["steps"] == 3
    assert s["best_step"] == 0 and best_checkpoint(s["run_dir"]).name == "best_00000000"
    # `checkpoints/best` names it wherever a checkpoint is read (compress, export, finetune.init), as `latest` does
    best = ckpt.resolve_checkpoint(Path(s["run_dir"]) / "checkpoints" / "best")
    assert best == best_checkpoint(s["run_dir"]) and best != ckpt.resolve_checkpoint(s["run_dir"])
    # a classifier is no start for a language-model fine-tune: said as such, not as a stray output.bias
    with pytest.raises(ConfigError) as e:
        prepare(load_config(overrides=["finetune.task=lm:email", f"finetune.init={s['run_dir']}"]))
    assert str(e.value).startswith(f"finetune.init={s['run_dir']}: a fine-tuned classifier (finetune.task=")


def test_bad_checkpoints_are_one_line(tmp_path, pets, pretrained, cache_dir):
    base = ft_overrides(tmp_path / "runs", pretrained, pets, cache_dir)
    from scaletrain.finetune import prepare
    from scaletrain.config import ConfigError

    for extra, want in (
        (["model.n_layer=3"], "checkpoint has model.n_layer=2 but the config asks for model.n_layer=3"),
        (["data.tokenizer=bpe"], "different vocabulary"),
        (["finetune.freeze_blocks=5"], "more than the model's 2 blocks"),
        (["finetune.snippet_tokens=64"], "exceeds the model's context"),
    ):
        with pytest.raises(ConfigError) as e:
            prepare(load_config(overrides=base + extra))
        assert want in str(e.value), str(e.value)
    with pytest.raises(ckpt.CheckpointError):
        prepare(load_config(overrides=base + [f"finetune.init={tmp_path}"]))
    # loading a checkpoint into a model of another shape is one line too
    from scaletrain.finetune import load_pretrained
    from scaletrain.config import ModelConfig

    other = build_classifier(
        ModelConfig(family="gpt", n_layer=2, n_head=2, n_embd=48, block_size=32, vocab_size=257), 3
    )
    with pytest.raises(ckpt.CheckpointError) as e:
        load_pretrained(pretrained, other)
    assert "a checkpoint of another model" in str(e.value) and "\n" not in str(e.value)  # names the first key
    # and through the command line: exit code 2, one line, no run folder
    r = run_cli("finetune", *base, "model.n_layer=3")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "different architecture" in r.stderr, r.stderr[
        -2000:
    ]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_finetune_from_fsdp_checkpoint_on_two_ranks(tmp_path, pets, corpus, cache_dir):
    """Pretrain under FSDP on 2 ranks; fine-tune from it in one process and under FSDP on 2 ranks: same weights, same
    step-0 eval."""
    r = run_cli(
        "train",
        "--nproc",
        "2",
        *tiny(
            corpus,
            cache_dir,
            tmp_path,
            "run.name=fsdp",
            "parallel.strategy=fsdp",
            "train.steps=4",
            "train.eval_every=0",
            "train.ckpt_every=0",
        ),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    pre = tmp_path / "fsdp"
    assert ckpt.read_trainer_state(ckpt.latest_checkpoint(pre))["world_size"] == 2
    # the classifier's body is the checkpoint's model, whatever layout wrote it
    from scaletrain.finetune import prepare

    cfg, task = prepare(load_config(overrides=ft_overrides(tmp_path, pre, pets, cache_dir)))
    model = task.build_model(cfg)
    assert isinstance(model, GPT) and isinstance(model.lm_head, PooledHead)
    ckpt.export_safetensors(pre, tmp_path / "pre.safetensors")
    ref = dict(ckpt.load_safetensors(tmp_path / "pre.safetensors").named_parameters())
    for n, p in model.named_parameters():
        if not n.startswith("lm_head."):
            assert torch.equal(p, ref[n]), n
    one = finetune(cfg, task=task)
    r = run_cli(
        "finetune",
        "--nproc",
        "2",
        *ft_overrides(
            tmp_path, pre, pets, cache_dir, "run.name=ft2", "parallel.strategy=fsdp", "finetune.freeze_blocks=1"
        ),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    e1 = [x for x in read_metrics(Path(one["run_dir"]) / "metrics.jsonl") if "val_loss" in x]
    e2 = [x for x in read_metrics(tmp_path / "ft2" / "metrics.jsonl") if "val_loss" in x]
    # step 0: the same pretrained weights and head -> the same counts, summed over both ranks
    assert e1[0]["n"] == e2[0]["n"] == len(task.data.y["val"]) and e1[0]["accuracy"] == e2[0]["accuracy"]
    assert abs(e1[0]["val_loss"] - e2[0]["val_loss"]) < 1e-4
    s2 = json.loads((tmp_path / "ft2" / "summary.json").read_text())
    assert (
        s2["world_size"] == 2
        and s2["strategy"] == "fsdp"
        and s2["status"] == "finished"
        and best_checkpoint(tmp_path / "ft2")
    )
    # frozen under FSDP too: the sharded run's embeddings and first block are still the pretrained ones
    ft2, _ = load_classifier(tmp_path / "ft2" / "checkpoints" / "step_00000006")
    for n, p in ft2.named_parameters():
        if n.startswith(("wte.", "wpe.", "blocks.0.")):
            assert torch.equal(p, ref[n]), n
        elif n.startswith("blocks.1.") and p.dim() == 2:
            assert not torch.equal(p, ref[n]), n


def test_continued_pretraining_on_one_package_family(tmp_path, pretrained, cache_dir):
    """finetune.task=lm:<package>: the LM objective on one stdlib family, from the pretrained weights; its checkpoint
    starts a classifier."""
    cfg = load_config(
        overrides=[
            f"finetune.init={pretrained}",
            "finetune.task=lm:json",
            f"data.cache_dir={cache_dir}",
            f"run.out_dir={tmp_path}",
            "train.device=cpu",
            "train.micro_batch=4",
            "train.steps=4",
            "train.warmup_steps=1",
            "train.eval_every=2",
            "train.eval_iters=2",
            "train.ckpt_every=0",
        ]
    )
    # the task alone (make_task, the public entry) builds the pretrained model, as finetune does
    from scaletrain.finetune import make_task, resolve_config

    ref = GPT(ckpt.checkpoint_config(pretrained).model)
    ckpt.load_model_weights(pretrained, ref)
    rc = resolve_config(cfg)
    built = make_task(rc).build_model(rc)
    for (n, p), (_, q) in zip(built.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    s = finetune(cfg)
    assert s["status"] == "finished" and s["metric"] == "val_loss" and s["best_step"] in (0, 2, 4)
    assert ckpt.checkpoint_config(s["run_dir"]).finetune.labels == ""
    m = GPT(ckpt.checkpoint_config(best_checkpoint(s["run_dir"])).model)
    ckpt.load_model_weights(best_checkpoint(s["run_dir"]), m)
    assert m.lm_head.weight is m.wte.weight  # a plain (tied) GPT: usable as finetune.init for a classifier
    from scaletrain.config import ConfigError

    with pytest.raises(ConfigError, match="an lm: task measures val_loss only"):
        finetune(
            load_config(overrides=[f"finetune.init={pretrained}", "finetune.task=lm:json", "finetune.metric=accuracy"])
        )


def test_finetune_stopped_and_resumed_equals_uninterrupted(tmp_path, pets, pretrained, cache_dir):
    """A fine-tuning run stopped at step 4 and continued with `scaletrain finetune --resume` ends as the uninterrupted
    run: same evaluations, same best step and value (its past evaluations are replayed), same weights."""
    over = lambda name: ft_overrides(
        tmp_path,
        pretrained,
        pets,
        cache_dir,
        f"run.name={name}",
        "train.steps=8",
        "train.eval_every=2",
        "finetune.patience=0",
        "train.lr=1e-2",
        "finetune.metric=val_loss",
    )  # its best is before the stop: the replay must keep it

    class StopAt4(Callback):
        def after_step(self):
            if self.trainer.step == 4:
                self.trainer.stop_requested = True

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI's process has (run_cli): the same float reduction order on both sides
    try:
        full, part = (
            finetune(load_config(overrides=over("full"))),
            finetune(load_config(overrides=over("part")), callbacks=[StopAt4()]),
        )
    finally:
        torch.set_num_threads(threads)
    assert part["status"] == "stopped" and part["steps"] == 4
    r = run_cli("finetune", "--resume", tmp_path / "part")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "part" / "summary.json").read_text())
    evals = lambda run: [x for x in read_metrics(tmp_path / run / "metrics.jsonl") if "val_loss" in x]
    assert [e["step"] for e in evals("part")] == [e["step"] for e in evals("full")] == [0, 2, 4, 6, 8]
    for a, b in zip(evals("part"), evals("full")):
        assert a["accuracy"] == b["accuracy"] and abs(a["val_loss"] - b["val_loss"]) < 1e-5
    assert (s["status"], s["steps"], s["best_step"]) == ("finished", 8, full["best_step"]) and abs(
        s["best_value"] - full["best_value"]
    ) < 1e-9
    assert best_checkpoint(tmp_path / "part").name == best_checkpoint(tmp_path / "full").name
    wp, _ = load_classifier(ckpt.latest_checkpoint(tmp_path / "part"))
    wf, _ = load_classifier(ckpt.latest_checkpoint(tmp_path / "full"))
    for (n, p), (_, q) in zip(wp.named_parameters(), wf.named_parameters()):
        assert torch.equal(p, q), n
    # resumed once more, the finished fine-tune is left byte for byte: no re-evaluation, summary or plot rewritten
    files = lambda: {q: q.read_bytes() for q in sorted((tmp_path / "part").rglob("*")) if q.is_file()}
    before = files()
    r = run_cli("finetune", "--resume", tmp_path / "part")
    assert r.returncode == 0 and "is finished at step 8" in r.stdout and "scaletrain finetune --resume" in r.stdout
    assert files() == before
    # resuming needs its run folder's config: --config with --resume is one line, and so is a folder without one
    for args, want in (
        (["--resume", tmp_path / "part", "--config", tmp_path / "x.yaml"], "--config with --resume"),
        (["--resume", tmp_path], "not a run folder"),
    ):
        r = run_cli("finetune", *args)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and want in r.stderr, r.stderr[-2000:]


def test_llama_classifier_from_llama_checkpoint(tmp_path, pets, pretrained, pretrained_llama, cache_dir):
    """The default family end to end: the body loaded exactly, a new head in the spec's place, frozen blocks unchanged
    by training, parameter groups by the spec; prepare() and finetune() leave the config they are given unchanged."""
    from scaletrain.config import ConfigError

    over = lambda init, *extra: ft_overrides(
        tmp_path, init, pets, cache_dir, "finetune.freeze_blocks=1", "finetune.body_lr_scale=0.25", *extra
    )
    with pytest.raises(ConfigError) as e:
        prepare(load_config(overrides=over(pretrained_llama, "model.family=gpt")))
    assert "the checkpoint has model.family=llama but the config asks for model.family=gpt" in str(e.value)
    # the checkpoint's architecture is checked against the rest of the config: its one kv head cannot be split over tp=2
    want = "checkpoint's architecture, config: model.n_kv_head=1 key/value heads are not divisible by parallel.tp=2"
    with pytest.raises(ConfigError, match="n_kv_head=1 key/value heads are not divisible") as e:
        prepare(load_config(overrides=over(pretrained_llama, "parallel.tp=2")))
    assert want in str(e.value) and "\n" not in str(e.value)
    r = run_cli("finetune", "--nproc", "2", *over(pretrained_llama, "parallel.tp=2", "run.name=tp"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and want in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "tp").exists()
    # the family is the checkpoint's: the same (default-llama) config fine-tunes a GPT checkpoint as a GPT
    gcfg, gtask = prepare(load_config(overrides=over(pretrained)))
    assert gcfg.model.family == "gpt" and isinstance(gtask.build_model(gcfg), GPT)

    cfg = load_config(overrides=over(pretrained_llama))
    before = copy.deepcopy(cfg)
    rc, task = prepare(cfg)
    assert cfg == before and rc != cfg  # resolved in a copy
    assert (rc.model.family, rc.model.n_kv_head, rc.finetune.labels) == ("llama", 1, "birds,cats,dogs")
    model = task.build_model(rc)
    spec = spec_for(model)
    head = spec.get_head(model)
    assert isinstance(model, Llama) and spec.name == "llama" and spec.head == "output"
    assert isinstance(head, PooledHead) and head.weight.shape == (3, rc.model.n_embd)
    assert head.weight is not model.tok_embeddings.weight  # the pretrained model ties them; the classifier does not
    ref = build_model(ckpt.checkpoint_config(pretrained_llama).model)
    ckpt.load_model_weights(pretrained_llama, ref)
    P = dict(ref.named_parameters())
    body = {n: p for n, p in model.named_parameters() if not n.startswith(f"{spec.head}.")}
    assert set(body) == set(P)  # every pretrained weight is in the body (the tied head is the embedding)
    for n, p in body.items():
        assert torch.equal(p, P[n]), n
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in body if n.startswith(spec.first_prefixes() + spec.block_prefixes([0]))}
    assert "tok_embeddings.weight" in frozen and any(n.startswith("layers.0.") for n in frozen)
    groups = finetune_param_groups(model, rc.train.weight_decay, rc.finetune.body_lr_scale)
    name = {id(p): n for n, p in model.named_parameters()}
    by = {g["name"]: {name[id(p)] for p in g["params"]} for g in groups}
    last = {n for n, p in model.named_parameters() if n.startswith(spec.last_prefixes())}
    assert (
        by["head"] == {"output.weight"} and by["head_no_decay"] == {"output.bias", "norm.weight"} == last - by["head"]
    )
    assert by["body"] | by["body_no_decay"] == set(name.values()) - last - frozen
    assert all(g["lr_scale"] == (1.0 if g["name"].startswith("head") else 0.25) for g in groups)

    seen = []

    class Lrs(Callback):
        def after_step(self):
            seen.append({g["name"]: g["lr"] for g in self.trainer.engine.optimizer.param_groups})

    s = finetune(cfg, callbacks=[Lrs()])
    assert cfg == before and s["status"] == "finished" and s["labels"] == ["birds", "cats", "dogs"]
    ft, fcfg = load_classifier(Path(s["run_dir"]) / "checkpoints" / "step_00000006")
    assert isinstance(ft, Llama) and fcfg.model.n_kv_head == 1
    for n, p in ft.named_parameters():
        if n in frozen:
            assert torch.equal(p, P[n]), f"frozen {n} changed"
        elif n in P and p.dim() == 2:
            assert not torch.equal(p, P[n]), f"trainable {n} did not change"
    assert len(seen) == 6 and all(abs(l["body"] - 0.25 * l["head"]) < 1e-12 for l in seen)
    assert s["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n not in frozen)


def test_a_pretraining_run_that_trains_on_does_not_prune_the_fine_tunes_start(
    tmp_path, pets, pretrained, cache_dir, monkeypatch
):
    """`finetune.init` names a run that is still training (`train.keep_checkpoints=1`). Its next save comes after the
    fine-tune chose a step and before the weights load: the chosen step stays on disk (held) and is loaded; once the
    fine-tune ends nothing holds it and the run's next save prunes it. A task built without `hold=` has no such
    guard, and the load fails in one line."""
    import scaletrain.finetune as ft
    from scaletrain.errors import CheckpointError

    run = live_copy(pretrained, tmp_path)
    start = ckpt.latest_checkpoint(run)
    real, seen = ft.load_pretrained, []

    def after_a_save(path, model, spec=None):
        new = live_save(run)  # the live run saves and prunes (keep_checkpoints=1) just now
        seen.append((Path(path), new, Path(path).is_dir()))
        return real(path, model, spec)

    monkeypatch.setattr(ft, "load_pretrained", after_a_save)
    cfg = load_config(overrides=ft_overrides(tmp_path, run, pets, cache_dir, "run.name=ft", "train.steps=2"))
    s = finetune(cfg)
    assert s["status"] == "finished" and s["init"] == str(start)
    ((loaded, newer, there),) = seen
    assert loaded == start and there  # the step chosen at start, still on disk when it was read
    assert load_config(tmp_path / "ft" / "config.yaml").finetune.init == str(start)
    assert not (run / "checkpoints" / ckpt.READERS).exists()  # the hold went with the fine-tune
    live_save(run)
    assert not start.exists() and not newer.exists()  # and the live run's next save prunes as it should
    # a task prepared without a hold: the same save in the same place loses the checkpoint before it is read
    cfg, task = prepare(load_config(overrides=ft_overrides(tmp_path, run, pets, cache_dir, "run.name=ft2")))
    with pytest.raises(CheckpointError) as e:
        finetune(cfg, task=task)
    gone = run / "checkpoints" / "step_00000012"  # the newest when it was prepared, pruned by the save after
    assert str(e.value).startswith(f"checkpoint {gone}: no such file or folder") and "\n" not in str(e.value)


def test_the_finetune_launcher_holds_the_start_for_its_ranks(tmp_path, pets, pretrained, cache_dir, monkeypatch):
    """`scaletrain finetune --nproc 2` chooses the step and writes it to config.yaml; the ranks read it later (and a
    rank torchrun restarts from step 0 reads it again). The launcher holds it for the whole job: the live run's
    saves while the job runs prune around it. The job itself is not run here: `launch_ranks` stands in for it."""
    import scaletrain.cli as cli

    run = live_copy(pretrained, tmp_path)
    start = ckpt.latest_checkpoint(run)
    during = []

    def job(args, cfg, run_dir, rank_argv, local_main):
        during.append((cfg.finetune.init, live_save(run), live_save(run)))  # two saves while the job runs
        during.append(start.is_dir() and (start / ".metadata").is_file())
        return 0

    monkeypatch.setattr(cli, "launch_ranks", job)
    rc = cli.finetune_main(["--nproc", "2", *ft_overrides(tmp_path, run, pets, cache_dir, "run.name=ft")])
    (init, first, second), kept = during
    assert rc == 0 and init == str(start) and kept
    assert load_config(tmp_path / "ft" / "config.yaml").finetune.init == str(start)
    assert not first.exists() and second.is_dir()  # pruning went on around the held step
    assert not (run / "checkpoints" / ckpt.READERS).exists()  # released when the job ended
    live_save(run)
    assert not start.exists()


def test_resume_takes_the_command_that_made_the_run_and_keeps_the_task(tmp_path, pets, pretrained, cache_dir):
    """`finetune --resume` of a pretraining run and `train --resume` of a fine-tune name the right command; a resume
    that would change the task, the classes, the snippets or the metric the best checkpoint was chosen by is refused;
    a schedule change (more steps, fewer frozen blocks) is not. One line each, exit 2, nothing written."""
    from scaletrain.jobs import resume_changes

    ov = ft_overrides(tmp_path, pretrained, pets, cache_dir, "run.name=ft", "train.steps=2", "train.ckpt_every=2")
    s = finetune(load_config(overrides=ov))
    run = Path(s["run_dir"])
    assert s["engine"] == "single" and s["strategy"] == "ddp"  # what ran, beside what was configured
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    pre_before = sorted((p.relative_to(pretrained), p.stat().st_mtime_ns) for p in pretrained.rglob("*"))
    for cmd, where, line in (
        (
            ["finetune", "--resume", pretrained],
            pretrained,
            "a pretraining run (its config has no finetune.init); "
            f"continue it with: scaletrain train --resume {pretrained}",
        ),
        (
            ["train", "--resume", run],
            run,
            f"a fine-tuning run (its config has finetune.init); continue it with: scaletrain finetune --resume {run}",
        ),
    ):
        r = run_cli(*cmd, "train.steps=4")
        assert r.returncode == 2 and r.stderr.strip() == f"scaletrain: error: --resume {where}: {line}", r.stderr
    for change in ("finetune.labels=a,b,c", "finetune.snippet_tokens=8", "finetune.metric=val_loss"):
        r = run_cli("finetune", "--resume", run, "train.steps=4", change)
        key = change.split("=")[0]
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and f"--resume: {key}=" in lines[0], r.stderr
        assert "cannot change" in lines[0] and "start a new fine-tune" in lines[0], lines[0]
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    assert sorted((p.relative_to(pretrained), p.stat().st_mtime_ns) for p in pretrained.rglob("*")) == pre_before
    ck = ckpt.checkpoint_config(ckpt.latest_checkpoint(run))
    later = copy.deepcopy(ck)
    later.train.steps, later.finetune.freeze_blocks = 9, 1  # gradual unfreezing is a schedule, not a new task
    assert resume_changes(ck, later) == ["train.steps 2 -> 9", "finetune.freeze_blocks 0 -> 1"]


def test_a_task_that_is_a_file_of_another_kind_is_named_as_such(tmp_path):
    from scaletrain.errors import DataError
    from scaletrain.tasks import task_kind

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as e:
        task_kind(str(tmp_path / "notes.txt"))
    assert str(e.value).startswith(f"finetune.task='{tmp_path / 'notes.txt'}': a .txt file, not a task; use ")
    with pytest.raises(DataError, match="': not found; use "):
        task_kind(str(tmp_path / "missing"))


def test_pipeline_parallel_fine_tuning_is_refused_first_for_its_own_reason(tmp_path, pretrained):
    "Not the tied-head advice of pretraining's pipeline rules, which would only lead to this refusal next."
    r = run_cli("finetune", "--nproc", "2", "parallel.pp=2", f"finetune.init={pretrained}", f"run.out_dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip() == (
        "scaletrain: error: config: parallel.pp=2: fine-tuning evaluates whole-model logits, which pipeline stages "
        "do not have; use ddp, zero1, zero2, fsdp or tp"
    ), r.stderr
    assert not any(tmp_path.iterdir())


def test_the_model_card_of_an_lm_fine_tune_names_its_data_and_its_start():
    from scaletrain.export import model_card

    facts = dict(world_size=1, strategy="ddp", step=20, tokens=10240, train_loss=4.1, val_loss=4.2)
    tuned = load_config(overrides=["finetune.task=lm:email", "finetune.init=runs/pre/checkpoints/step_00000020"])
    card = model_card(tuned, facts, 40_000, "llama")
    assert "| data | `lm:email` of `stdlib` (tokenizer `byte`) |" in card
    assert "| fine-tuned from | `runs/pre/checkpoints/step_00000020` (continued pretraining) |" in card
    assert "| tokens seen (this fine-tune) | 10,240 |" in card
    plain = model_card(load_config(), facts, 40_000, "llama")
    assert "| data | `stdlib` (tokenizer `byte`) |" in plain and "fine-tuned from" not in plain

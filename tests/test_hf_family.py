"""Hugging Face `transformers` models as a family: `LlamaForCausalLM` and `GPT2LMHeadModel` from tiny configs (saved
with `save_pretrained`), passed in Python to `scaletrain.loop.setup`, under ddp, zero1, fsdp, activation checkpointing
(recompute counted), bf16-mixed, tensor parallelism (the Llama layout) and pipeline parallelism (cut by decoder
layers) -- each equal to one process. Then `scaletrain train model.family=hf model.hf_path=DIR` end to end: train,
--resume, export -> `from_pretrained` -> equal logits; and the refusals (one line, exit 2, nothing written)."""

import json
import subprocess
import sys
import pytest
import torch
from conftest import ROOT, run_cli
from scaletrain.engine import clean_name
from scaletrain.procs import child_env, torchrun_args

pytest.importorskip("transformers")
sys.path.insert(0, str(ROOT / "tests"))
import hf_family_helpers as H  # noqa: E402
import own_model_helpers as O  # noqa: E402
from ft_helpers import make_pets  # noqa: E402

DP = [
    ("ddp", ["parallel.strategy=ddp"]),
    ("zero1", ["parallel.strategy=zero1"]),
    ("fsdp", ["parallel.strategy=fsdp"]),
    ("ac", ["parallel.strategy=fsdp", "memory.activation_checkpointing=full"]),
    ("bf16", ["parallel.strategy=ddp", "memory.precision=bf16-mixed"]),
    ("zero2", ["parallel.strategy=zero2"]),
    ("fsdp_bf16", ["parallel.strategy=fsdp", "memory.precision=bf16-mixed"]),
]
CASES = (
    [(f"{k}_{n}", k, o) for k in ("hf_llama", "hf_gpt2") for n, o in DP]
    + [("hf_llama_tp", "hf_llama", ["parallel.tp=2"])]
    + [(f"{k}_pp", k, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]) for k in ("hf_llama", "hf_gpt2u")]
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfmodels")
    return {k: str(H.save_tiny(k, root / k)) for k in ("hf_llama", "hf_gpt2", "hf_gpt2u")}


@pytest.fixture(scope="module")
def two(tmp_path_factory, folders):
    out = tmp_path_factory.mktemp("hf2")
    spec = out / "spec.json"
    spec.write_text(json.dumps([dict(name=n, folder=folders[k], overrides=o) for n, k, o in CASES]))
    cmd = torchrun_args([str(ROOT / "tests" / "hf_family_worker.py"), str(spec), str(out)], nproc=2)
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return out


_REF = {}


def reference(folder, overrides):
    "One process, the whole global batch, no parallelism (the precision kept)."
    key = (folder, tuple(o for o in overrides if o.startswith("memory.precision")))
    if key not in _REF:
        _REF[key] = H.run_case(folder, list(key[1]))
    return _REF[key]


def ranks(out, name):
    return [torch.load(out / name / f"rank{r}.pt", weights_only=False) for r in range(2)]


TOL = {"fp32": (1e-5, 1e-4, 2e-5), "bf16": (2e-2, None, None)}  # as tests/test_own_model.py


@pytest.mark.parametrize("name,kind,overrides", CASES, ids=[c[0] for c in CASES])
def test_transformers_model_on_two_processes_equals_one(two, folders, name, kind, overrides):
    res, ref = ranks(two, name), reference(folders[kind], overrides)
    half = "bf16" in name
    lt, wr, wa = TOL["bf16" if half else "fp32"]
    w = {}
    for r in res:
        assert len(r["losses"]) == O.STEPS
        for a, b in zip(r["losses"], ref["losses"]):
            assert abs(a - b) <= lt * abs(b), (name, r["losses"], ref["losses"])
        for a, b in zip(r["grad_norms"], ref["grad_norms"]):
            assert abs(a - b) <= 10 * lt * abs(b), (name, r["grad_norms"], ref["grad_norms"])
        for k, v in r["weights"].items():
            w.setdefault(clean_name(k), v)
        assert r["optimizer"] == "CountingAdamW" and r["steps_taken"] == O.STEPS  # the user's optimizer stepped
    ref_w = {clean_name(k): v for k, v in ref["weights"].items()}
    assert set(w) == set(ref_w), set(ref_w) ^ set(w)
    if name.endswith("_pp"):  # each stage holds its part; together, the whole model
        assert not set(res[0]["weights"]) & set(res[1]["weights"])
    if half:  # 16-bit rounding moves Adam's early updates: the update itself must agree, to 10%
        init = {clean_name(k): v.float() for k, v in H.load(folders[kind]).state_dict().items()}
        off = sum(float((v - ref_w[k]).norm() ** 2) for k, v in w.items()) ** 0.5
        moved = sum(float((ref_w[k] - init[k]).norm() ** 2) for k in w) ** 0.5
        assert off < 0.1 * moved, (name, off, moved)
        return
    for k, v in w.items():
        assert torch.allclose(v, ref_w[k], rtol=wr, atol=wa), (name, k, (v - ref_w[k]).abs().max())
    want = {"tp": "tp", "pp": "pp-1f1b"}.get(name.rsplit("_", 1)[1], overrides[0].split("=")[1])
    assert res[0]["engine"] == want, (name, res[0]["engine"])
    assert res[0]["dp"] == (1 if name.endswith(("_tp", "_pp")) else 2)


def test_blocks_come_from_no_split_modules_and_sharding_happens(two):
    assert ranks(two, "hf_llama_ddp")[0]["describe"].startswith("4 blocks of LlamaDecoderLayer (_no_split_modules)")
    assert ranks(two, "hf_gpt2_ddp")[0]["describe"].startswith("4 blocks of GPT2Block (_no_split_modules)")
    for name in ("hf_llama_fsdp", "hf_gpt2_fsdp", "hf_llama_tp", "hf_llama_pp"):
        whole = ranks(two, name.rsplit("_", 1)[0] + "_ddp")[0]["param_bytes"]
        held = [r["param_bytes"] for r in ranks(two, name)]
        assert all(h < 0.8 * whole for h in held), (name, held, whole)


@pytest.mark.parametrize("kind", ["hf_llama", "hf_gpt2"])
def test_activation_checkpointing_recomputes_every_decoder_layer(two, kind):
    for p, a in zip(ranks(two, f"{kind}_fsdp"), ranks(two, f"{kind}_ac")):
        assert p["block_calls"] == O.STEPS * p["n_blocks"]
        assert a["block_calls"] == 2 * O.STEPS * a["n_blocks"]


# ---------------------------------------------------------------- `scaletrain train model.family=hf` end to end


def hf_run(corpus, cache_dir, out, folder, *extra):
    return [
        f"data.source={corpus}",
        f"data.cache_dir={cache_dir}",
        f"run.out_dir={out}",
        "train.device=cpu",
        "model.family=hf",
        f"model.hf_path={folder}",
        "train.micro_batch=4",
        "train.warmup_steps=2",
        "train.eval_every=3",
        "train.eval_iters=2",
        "train.ckpt_every=3",
        *extra,
    ]


def byte_gpt2(folder, tie):
    import transformers

    c = transformers.GPT2Config(vocab_size=260, n_embd=32, n_layer=2, n_head=4, n_positions=32, tie_word_embeddings=tie)
    c.bos_token_id = c.eos_token_id = 0
    transformers.GPT2LMHeadModel(c).save_pretrained(folder)
    return folder


def _losses(run):
    return {
        r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x).logits.float()


def test_scaletrain_train_family_hf_trains_resumes_and_exports(tmp_path, corpus, cache_dir):
    import transformers
    from scaletrain.checkpoint import load_model_weights
    from scaletrain.config import load_config
    from scaletrain.models.spec import build_model

    folder = H.byte_decoder(tmp_path / "hf")
    out = tmp_path / "runs"
    nproc2 = ("--nproc", "2")  # the Trainer on two processes under FSDP, sharded checkpoints
    r = run_cli(
        "train",
        *nproc2,
        *hf_run(corpus, cache_dir, out, folder, "train.steps=3", "run.name=first", "parallel.strategy=fsdp"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    first = out / "first"
    cfg = load_config(first / "config.yaml")
    assert (cfg.model.family, cfg.model.hf_path, cfg.model.n_layer, cfg.model.vocab_size) == ("hf", str(folder), 2, 260)
    assert json.loads((first / "hf_config" / "config.json").read_text())["model_type"] == "llama"  # rebuildable
    r = run_cli("train", *nproc2, "--resume", first, "train.steps=6")
    assert r.returncode == 0 and "resumed" in r.stdout + r.stderr, r.stderr[-3000:]
    r = run_cli(
        "train",
        *nproc2,
        *hf_run(corpus, cache_dir, out, folder, "train.steps=6", "run.name=straight", "parallel.strategy=fsdp"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    resumed, straight = _losses(first), _losses(out / "straight")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6] and resumed == straight  # weights and AdamW state restored exactly
    assert json.loads((first / "summary.json").read_text())["strategy"] == "fsdp"
    # export: the trained transformers model's save_pretrained, the tokenizer and the card
    r = run_cli("export", first, tmp_path / "export")
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(names), names
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ours = build_model(cfg.model)
    load_model_weights(first, ours)
    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    a, b = _logits(ours, x), _logits(back, x)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5
    start = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert (a - _logits(start, x)).abs().max() > 1e-4  # it trained: not the starting weights
    assert "| steps | 6 |" in (tmp_path / "export" / "README.md").read_text()
    # fine-tuning starts from the run (the transformers class again, the run's weights); a classifier is refused
    ft = [f"finetune.init={first}", f"data.cache_dir={cache_dir}", f"run.out_dir={tmp_path / 'ft'}", "train.device=cpu"]
    ft += ["train.micro_batch=4", "train.steps=2", "train.warmup_steps=1", "train.eval_every=2", "train.eval_iters=1"]
    r = run_cli("finetune", *ft, "finetune.task=lm:json", "train.ckpt_every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    ft_run = next((tmp_path / "ft").iterdir())
    assert load_config(ft_run / "config.yaml").model.family == "hf"
    pets = make_pets(tmp_path / "pets")
    one_line_exit_2(run_cli("finetune", *ft, f"finetune.task={pets}"), "model.family=hf", "classifier heads")
    # compression works on fine-tuned classifiers; an LM run of any family is refused in one line
    one_line_exit_2(run_cli("compress", first, "--out", tmp_path / "c"), "not a fine-tuned classifier")
    assert not (tmp_path / "c").exists()
    # the original folder moves: the run rebuilds from its copy of config.json and its own checkpoint
    folder.rename(tmp_path / "moved")
    r = run_cli("export", first, tmp_path / "export2")
    assert r.returncode == 0, r.stderr[-3000:]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export2")
    assert torch.equal(_logits(again, x), b)
    # and resumes: the structure from the copy, the weights and optimizer state from the checkpoint
    r = run_cli("train", "--resume", first, "train.steps=7")
    assert r.returncode == 0 and "hf_config" in r.stdout + r.stderr, r.stderr[-3000:]
    after = _losses(first)
    assert sorted(after) == [1, 2, 3, 4, 5, 6, 7] and {k: after[k] for k in straight} == straight


def one_line_exit_2(r, *expect):
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    errs = [line for line in r.stderr.splitlines() if line.startswith("scaletrain: error: ")]
    assert len(errs) == 1 and all(e in errs[0] for e in expect), r.stderr[-2000:]


def test_family_hf_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, corpus, cache_dir):
    out = tmp_path / "runs"
    tied, untied = byte_gpt2(tmp_path / "tied", True), byte_gpt2(tmp_path / "untied", False)
    cases = [
        (["model.family=hf"], ("model.family=hf needs model.hf_path=DIR",)),
        (["model.family=hf", f"model.hf_path={tmp_path / 'nowhere'}"], ("no config.json",)),
        (
            ["model.family=hf", f"model.hf_path={tied}", "parallel.pp=2", "--nproc", "2"],
            ("parallel.pp=2 with model.hf_path=", "ties the embedding and the output head"),
        ),
        (
            ["model.family=hf", f"model.hf_path={untied}", "parallel.tp=2", "--nproc", "2"],
            ("GPT-2", "fused c_attn", "model.family=gpt"),
        ),
    ]
    for args, expect in cases:
        r = run_cli("train", f"data.source={corpus}", f"data.cache_dir={cache_dir}", f"run.out_dir={out}", *args)
        one_line_exit_2(r, *expect)
        assert not out.exists() or not any(out.iterdir()), args


def test_a_folders_shape_and_damaged_weights_are_refused_before_any_run_folder(tmp_path, corpus, cache_dir):
    """The folder's own head count against parallel.tp, and weight files that cannot be read, are said by the
    launcher (the folder's values, named as its config.json's); a tensor that only transformers' load can find
    missing is refused by the ranks, and the run folder they were given is removed: a refusal writes nothing."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "runs"
    kv1 = H.byte_decoder(tmp_path / "kv1", num_key_value_heads=1)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_bytes((kv1 / "config.json").read_bytes())
    whole = (kv1 / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(whole[: len(whole) // 2])  # a download that stopped half-way
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_bytes((kv1 / "config.json").read_bytes())
    sd = load_file(kv1 / "model.safetensors")
    sd["stray.weight"] = sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, renamed / "model.safetensors", metadata={"format": "pt"})
    cases = [
        (
            [f"model.hf_path={kv1}", "parallel.tp=2", "--nproc", "2"],
            ("model.n_kv_head=1", "parallel.tp=2", f"config.json of model.hf_path='{kv1}'"),
        ),
        ([f"model.hf_path={cut}"], (f"model.hf_path='{cut}': unreadable weights",)),
        (
            [f"model.hf_path={renamed}"],
            ("missing_keys", "model.layers.1.mlp.up_proj.weight", "unexpected_keys", "stray.weight"),
        ),
    ]
    for args, expect in cases:
        r = run_cli(
            "train",
            f"data.source={corpus}",
            f"data.cache_dir={cache_dir}",
            f"run.out_dir={out}",
            "model.family=hf",
            "train.steps=2",
            "train.warmup_steps=1",
            *args,
        )
        one_line_exit_2(r, *expect)
        assert "LOAD REPORT" not in r.stderr + r.stdout  # transformers' own table: our one line says it
        assert not out.exists() or not any(out.iterdir()), (args, list(out.iterdir()))
    assert "removed" in r.stderr and "refused before its first step" in r.stderr  # the ranks' refusal


@pytest.mark.parametrize("kind", ["hf_llama", "hf_gpt2", "hf_gpt2u"])
def test_the_estimators_shape_counts_the_transformers_model(folders, kind):
    "model.family=hf: the config's shape comes from config.json, and the estimator counts what the model holds."
    from scaletrain.config import load_config
    from scaletrain.models.hub import resolve_hf
    from scaletrain.models.spec import build_model, get_spec

    cfg = resolve_hf(load_config(overrides=["model.family=hf", f"model.hf_path={folders[kind]}"]))
    assert (cfg.model.family, cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size) == ("hf", 4, 32, H.VOCAB)
    model = build_model(cfg.model)
    unique = {id(p): p for p in model.parameters()}.values()
    assert get_spec("hf").shape(cfg.model).n_params() == sum(p.numel() for p in unique)
    assert model.config.use_cache is False


def test_the_trainer_takes_a_pretrained_model_passed_in_python(tmp_path, corpus, cache_dir):
    import transformers
    from scaletrain.checkpoint import load_model_weights
    from scaletrain.config import ConfigError, load_config
    from scaletrain.train import Trainer

    folder = H.byte_decoder(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ov = hf_run(corpus, cache_dir, tmp_path / "runs", folder, "train.steps=3")
    s = Trainer(load_config(overrides=ov), run_dir=tmp_path / "runs" / "py", model=model).fit()
    assert s["status"] == "finished" and s["family"] == "hf" and s["steps"] == 3
    back = transformers.AutoModelForCausalLM.from_pretrained(folder)
    load_model_weights(tmp_path / "runs" / "py", back)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())  # what it trained
    assert not torch.equal(back.state_dict()["lm_head.weight"], start["lm_head.weight"])
    other = [o for o in ov if not o.startswith(("model.family", "model.hf_path"))] + ["model.vocab_size=260"]
    with pytest.raises(ConfigError) as e:
        Trainer(load_config(overrides=other), run_dir=tmp_path / "runs" / "no", model=model)
    assert str(e.value) == "config: model.family=llama, but the model given is of family hf"
    assert not (tmp_path / "runs" / "no").exists()


def test_a_qwen2_folder_trains_as_itself_and_the_estimator_counts_it(tmp_path, corpus, cache_dir):
    "A decoder our families do not read (Qwen2: biases on q/k/v only) trains through model.family=hf."
    from scaletrain.config import load_config
    from scaletrain.models.hub import resolve_hf
    from scaletrain.models.spec import build_model, get_spec

    pytest.importorskip("transformers")
    kv1 = dict(num_attention_heads=2, num_key_value_heads=1)
    H.byte_decoder(tmp_path / "qwen", "Qwen2", max_position_embeddings=64, tie_word_embeddings=True, **kv1)
    cfg = resolve_hf(load_config(overrides=["model.family=hf", f"model.hf_path={tmp_path / 'qwen'}"]))
    model = build_model(cfg.model)
    held = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    counted = get_spec("hf").shape(cfg.model).n_params()
    assert counted <= held and (held - counted) / held < 0.02  # only the q/k/v biases are left out
    r = run_cli(
        "train",
        "model.family=hf",
        f"model.hf_path={tmp_path / 'qwen'}",
        "model.block_size=32",
        f"data.source={corpus}",
        f"data.cache_dir={cache_dir}",
        f"run.out_dir={tmp_path / 'runs'}",
        "run.name=q",
        "train.device=cpu",
        "train.steps=2",
        "train.warmup_steps=1",
        "train.micro_batch=2",
        "train.eval_iters=1",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "q" / "summary.json").read_text())["status"] == "finished"

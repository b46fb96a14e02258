"""The fused q/k/v layout (`model.fused_qkv=true`): one Linear in the grouped order, for gpt and llama (with
grouped-query attention). It computes what the separate layout computes (logits and gradients), converts back to the
same state dict, trains under tensor parallelism (and FSDP with activation checkpointing) as one process trains the
separate layout, reads Hugging Face folders and exports to them, resumes, and refuses a tp that splits a group.

Also the torchrun worker of the 2-process test: `python tests/test_fused_qkv.py CORPUS CACHE OUT` under torchrun."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
import pytest
import torch
from conftest import ROOT, run_cli, tiny
from scaletrain.config import ModelConfig, load_config
from scaletrain.errors import ConfigError
from scaletrain.models import gpt, llama
from scaletrain.models.spec import build_model, get_spec, spec_for

FAMILY = {"gpt": gpt, "llama": llama}
LLAMA = ["model.family=llama", "model.bias=false", "model.n_kv_head=2"]  # 4 query heads share 2 kv heads
FUSED = "model.fused_qkv=true"


def pair(family: str, **kw):
    "The same weights in both layouts: (separate model, fused model, fused shape)."
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=257, bias=True)
    if family == "llama":
        base |= dict(n_kv_head=2)
    c = ModelConfig(family=family, **(base | kw))
    torch.manual_seed(0)
    m = build_model(c)
    cf = replace(c, fused_qkv=True)
    mf = build_model(cf)
    shape = get_spec(family).shape(cf)
    mf.load_state_dict(FAMILY[family].fuse_state_dict(m.state_dict(), shape), strict=True)
    return m, mf, shape


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [("gpt", {}), ("llama", {}), ("llama", dict(n_kv_head=1, bias=False)), ("llama", dict(n_kv_head=4))]
IDS = ["gpt", "llama-gqa2", "llama-mqa", "llama-mha"]


@pytest.mark.parametrize("family,kw", CASES, ids=IDS)
def test_fused_model_has_equal_logits_and_gradients(family, kw):
    m, mf, shape = pair(family, **kw)
    assert not any(k.endswith(FAMILY[family].QKV[0] + ".weight") for k in mf.state_dict())
    x = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for model in (m, mf):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())
        loss.backward()
        losses.append((out.detach(), loss.item()))
    assert rel(losses[1][0], losses[0][0]) <= 1e-6 and abs(losses[1][1] - losses[0][1]) <= 1e-6 * losses[0][1]
    grads = FAMILY[family].fuse_state_dict({k: p.grad for k, p in m.named_parameters()}, shape)
    for k, p in mf.named_parameters():
        assert rel(p.grad, grads[k]) <= 1e-6, k
    # and back: the very same state dict (keys and values)
    back = FAMILY[family].unfuse_state_dict(mf.state_dict(), shape)
    want = m.state_dict()
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)


def test_a_plain_concatenation_would_not_do():
    "The check above can fail: q, k, v rows in the order [q; k; v] (GPT-2's) give llama with GQA other logits."
    m, mf, shape = pair("llama")
    sd, cat = m.state_dict(), {}
    for k in mf.state_dict():
        if llama.FUSED_QKV in k:
            pre, suffix = k.split(llama.FUSED_QKV)  # "layers.0.", ".weight"
            cat[k] = torch.cat([sd[f"{pre}{p}{suffix}"] for p in llama.QKV])
        else:
            cat[k] = sd[k]
    mf.load_state_dict(cat)
    x = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        assert rel(mf(x), m(x)) > 1e-3


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_the_fused_spec_counts_and_plans_the_fused_model(family):
    m, mf, shape = pair(family)
    spec = get_spec(family)
    unique = {id(p): p for p in mf.parameters()}.values()
    assert sum(p.numel() for p in unique) == shape.n_params() == spec.shape(m.config).n_params()
    assert len(unique) == shape.n_tensors(shape.n_layer)
    assert shape.flops_per_token() == spec.shape(m.config).flops_per_token()
    plan = spec_for(mf).tp_plan(sequence_parallel=True).block
    assert plan[FAMILY[family].FUSED_QKV] == "colwise" and not set(FAMILY[family].QKV) & set(plan)
    assert spec_for(m) is spec and set(FAMILY[family].QKV) <= set(spec_for(m).tp_plan().block)


def test_tp_that_splits_a_key_value_group_is_refused_in_one_line():
    ov = [
        "model.family=llama",
        "model.n_head=6",
        "model.n_kv_head=3",
        "model.n_embd=96",
        "model.ffn_dim=192",
        FUSED,
        "parallel.tp=2",
    ]
    with pytest.raises(ConfigError) as e:
        load_config(overrides=ov)
    msg = str(e.value)
    assert "\n" not in msg and all(s in msg for s in ("model.n_kv_head=3", "parallel.tp=2", "model.fused_qkv=true"))
    load_config(overrides=ov[:-1] + ["parallel.tp=3"])  # a tp that divides the groups is fine


def test_the_hf_family_refuses_fused_qkv():
    with pytest.raises(ConfigError, match="model.fused_qkv=true with model.family=hf"):
        load_config(overrides=["model.family=hf", FUSED])


# ---- tensor parallel (and FSDP + activation checkpointing) on 2 processes, against one process unfused ----
TP_CASES = [  # name, overrides, data-parallel degree
    ("gpt_tp", ["parallel.tp=2"], 1),
    ("llama_tp", [*LLAMA, "parallel.tp=2"], 1),  # one key/value group per rank
    ("llama_tp_sp", [*LLAMA, "parallel.tp=2", "parallel.sequence_parallel=true"], 1),
    ("llama_fsdp_ac", [*LLAMA, "parallel.strategy=fsdp", "memory.activation_checkpointing=full"], 2),
]


def _worker(corpus, cache_dir, out):
    "Each case: the separate layout's initial weights, fused, trained by the Trainer on this rank."
    import torch.distributed as dist
    from test_parallel import common
    from dist_worker import full_weights
    from scaletrain.dist import teardown
    from scaletrain.train import Trainer

    out = Path(out)
    for name, overrides, _ in TP_CASES:
        cfg = load_config(overrides=common(corpus, cache_dir) + overrides + [FUSED, f"run.out_dir={out / name}"])
        mc = replace(cfg.model, vocab_size=257)  # the byte tokenizer's, as the Trainer resolves it
        torch.manual_seed(cfg.train.seed)  # the initial weights of the one-process, separate-layout reference
        sep = build_model(replace(mc, fused_qkv=False))
        fused = build_model(mc)
        shape = get_spec(mc.family).shape(mc)
        fused.load_state_dict(FAMILY[mc.family].fuse_state_dict(sep.state_dict(), shape))
        t = Trainer(cfg, model=fused, default_callbacks=False)
        t.fit()
        w = FAMILY[mc.family].unfuse_state_dict(full_weights(t.engine), shape)
        res = dict(
            losses=[r["loss"] for r in t.history],
            grad_norms=[r["grad_norm"] for r in t.history],
            weights=w,
            engine=t.engine.name,
            plan=sorted(spec_for(fused).tp_plan().block),
        )
        (out / name).mkdir(parents=True, exist_ok=True)
        torch.save(res, out / name / f"rank{dist.get_rank()}.pt")
        dist.barrier()
    teardown()


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory, corpus, cache_dir):
    from scaletrain.procs import child_env, torchrun_args

    out = tmp_path_factory.mktemp("fused_tp")
    cmd = torchrun_args([str(Path(__file__).resolve()), str(corpus), str(cache_dir), str(out)], nproc=2)
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return out


@pytest.mark.parametrize("name,overrides,dp", TP_CASES, ids=[c[0] for c in TP_CASES])
def test_fused_model_under_tp_trains_as_one_process_separate_model(
    tp_runs, corpus, cache_dir, tmp_path, name, overrides, dp
):
    from test_parallel import assert_equivalent, reference

    res = [torch.load(tp_runs / name / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref_l, ref_w = reference(corpus, cache_dir, tmp_path, overrides, dp)  # no fused_qkv: the separate layout
    assert_equivalent(res, ref_l, ref_w, rtol=1e-5)  # test_parallel's TP tolerance
    fused_name = llama.FUSED_QKV if "llama" in name else gpt.FUSED_QKV
    assert fused_name in res[0]["plan"] and res[0]["engine"] == ("fsdp" if dp == 2 else "tp")


# ---- Hugging Face folders in, exports out ----
@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_a_hugging_face_folder_reads_into_a_fused_model_with_equal_logits(tmp_path, family):
    pytest.importorskip("transformers")
    from scaletrain.models.hub import load_hf
    from test_hf import X, hf_gpt2, hf_llama, logits
    from test_hf import rel as rel_hf

    hf = (hf_llama if family == "llama" else hf_gpt2)(tmp_path / "hf")
    ours, mc = load_hf(tmp_path / "hf", fused_qkv=True)
    assert mc.fused_qkv and any(k.endswith(FAMILY[family].FUSED_QKV + ".weight") for k in ours.state_dict())
    assert rel_hf(logits(hf, X), logits(ours, X)) <= 1e-5


def test_a_run_from_a_hugging_face_folder_trains_the_fused_layout(tmp_path, corpus, cache_dir):
    "model.hf_path=DIR model.fused_qkv=true: the folder's weights, fused, from step 0 (lr 0: unchanged by training)."
    pytest.importorskip("transformers")
    from scaletrain.checkpoint import load_model_weights
    from test_hf import X, hf_llama, logits
    from test_hf import rel as rel_hf

    hf = hf_llama(tmp_path / "hf")
    extra = [f"model.hf_path={tmp_path / 'hf'}", FUSED, "run.name=r", "train.steps=2", "train.lr=0"]
    extra += ["train.weight_decay=0", "train.warmup_steps=0"]
    ov = [o for o in tiny(corpus, cache_dir, tmp_path / "runs", *extra) if not o.startswith("model.")] + extra[:2]
    r = run_cli("train", *ov)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = load_config(tmp_path / "runs" / "r" / "config.yaml")
    assert cfg.model.fused_qkv and cfg.model.family == "llama"
    ours = build_model(cfg.model)
    assert any(k.endswith(llama.FUSED_QKV + ".weight") for k in ours.state_dict())
    load_model_weights(tmp_path / "runs" / "r", ours)
    assert rel_hf(logits(hf, X), logits(ours, X)) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_a_fused_run_exports_the_standard_layout_with_equal_logits(tmp_path, corpus, cache_dir, family):
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open
    from scaletrain.checkpoint import load_model_weights
    from test_hf import X, logits
    from test_hf import rel as rel_hf

    extra = (LLAMA if family == "llama" else []) + [FUSED, "run.name=r", "train.steps=3", "train.ckpt_every=3"]
    r = run_cli("train", *tiny(corpus, cache_dir, tmp_path / "runs", *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "r"
    r = run_cli("export", run, tmp_path / "export")
    assert r.returncode == 0 and "logits equal to ours" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    want = "model.layers.0.self_attn.k_proj.weight" if family == "llama" else "transformer.h.0.attn.c_attn.weight"
    assert want in keys and not any("wqkv" in k or "qkv_proj" in k for k in keys)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    cfg = load_config(run / "config.yaml")
    assert cfg.model.fused_qkv
    ours = build_model(cfg.model)
    load_model_weights(run, ours)
    assert rel_hf(logits(ours, X), logits(back, X)) <= 1e-5


def test_a_fused_run_resumes_exactly(tmp_path, corpus, cache_dir):
    from scaletrain.train import StopAfter, Trainer

    ov = tiny(corpus, cache_dir, tmp_path, *LLAMA, FUSED, "train.steps=4", "train.ckpt_every=2", "train.eval_every=0")
    straight = Trainer(load_config(overrides=ov + ["run.name=straight"]), default_callbacks=False)
    straight.fit()
    first = Trainer(load_config(overrides=ov + ["run.name=first"]), callbacks=[StopAfter(2)], default_callbacks=False)
    first.fit()
    run = first.run_dir
    resumed = Trainer(load_config(run / "config.yaml"), run_dir=run, resume=True, default_callbacks=False)
    resumed.fit()
    assert resumed.step == 4
    got = [r["loss"] for r in first.history] + [r["loss"] for r in resumed.history]
    assert got == [r["loss"] for r in straight.history]
    with pytest.raises(ConfigError, match="model.fused_qkv"):  # a resumed run keeps its layout
        Trainer(load_config(run / "config.yaml", ["model.fused_qkv=false"]), run_dir=run, resume=True)


if __name__ == "__main__":  # the torchrun worker of `tp_runs`
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _worker(*sys.argv[1:4])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/dist_worker.py: gloo's threads can abort a finished rank at interpreter exit

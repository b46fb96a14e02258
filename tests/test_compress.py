"""Compression: exact sparsity, quantized outputs close to float and smaller files, export -> load identical, the
report, bad input; for a GPT and for a llama classifier."""

import copy
import json
from pathlib import Path
import pytest
import torch
from conftest import run_cli
from ft_helpers import ft_overrides, pets, pretrained, pretrained_llama  # noqa: F401 (fixtures)
from scaletrain.config import load_config, ConfigError
from scaletrain.finetune import finetune, load_classifier
from scaletrain.compress import (
    prune_model,
    prunable_layers,
    quantize,
    output_gap,
    export_model,
    load_for_inference,
    QUANT_MODES,
)

# Stated tolerance for int8 (per-channel weights; per-token activations for int8-dynamic): on a batch of real snippets
# the largest logit difference to the float model is under 5% of the float logits' range, and >= 90% of the predicted
# labels agree.
REL_TOL, AGREE = 0.05, 0.9


@pytest.fixture(scope="module")
def classifier(pets, pretrained, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    s = finetune(
        load_config(
            overrides=ft_overrides(
                out, pretrained, pets, cache_dir, "run.name=ft", "train.steps=10", "train.eval_every=5"
            )
        )
    )
    model, cfg = load_classifier(s["run_dir"])
    from scaletrain.tasks import ClassificationTask

    x = torch.from_numpy(ClassificationTask(cfg).data.x["val"][:16].astype("int64"))
    return Path(s["run_dir"]), model, cfg, x


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_pruning_reaches_sparsity_exactly(classifier, sparsity):
    _, model, _, _ = classifier
    m = copy.deepcopy(model)
    reached = prune_model(m, sparsity, "unstructured")
    layers = prunable_layers(m)
    assert len(layers) == 12 and set(reached) == set(layers)
    for n, l in layers.items():
        assert int((l.weight == 0).sum()) == round(sparsity * l.weight.numel()), n
        assert not hasattr(l, "weight_orig") and type(l.weight) is torch.nn.Parameter  # permanent
    assert torch.equal(m.wte.weight, model.wte.weight) and torch.equal(
        m.lm_head.weight, model.lm_head.weight
    )  # not pruned
    s = copy.deepcopy(model)
    prune_model(s, sparsity, "structured")
    for n, l in prunable_layers(s).items():
        dead = l.weight.abs().sum(1) == 0
        assert int(dead.sum()) == round(sparsity * l.out_features), n
        assert torch.equal(l.bias[dead], torch.zeros(int(dead.sum())))


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_quantized_close_to_float_smaller_and_reloads_identically(classifier, mode, tmp_path):
    _, model, cfg, x = classifier
    q = copy.deepcopy(model)
    quantize(q, mode)
    gap = output_gap(q, model, x)
    assert gap["rel_diff"] < REL_TOL and gap["agreement"] >= AGREE, gap
    f = export_model(model, tmp_path / "float.safetensors", cfg)
    fq = export_model(q, tmp_path / f"{mode}.safetensors", cfg, mode)
    assert fq.stat().st_size < 0.75 * f.stat().st_size
    for path, ref in ((f, model), (fq, q)):
        back = load_for_inference(path)
        with torch.inference_mode():
            assert torch.equal(back(x), ref(x)), path.name
        assert back.labels == ["birds", "cats", "dogs"]


def test_compress_cli_report(classifier, tmp_path):
    run = classifier[0]
    r = run_cli(
        "compress",
        run,
        "--out",
        tmp_path / "c",
        "--sparsity",
        "0.5",
        "--recover-steps",
        "3",
        "--repeats",
        "2",
        "--batch",
        "8",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "c" / "report.json").read_text())["rows"]
    assert [x["stage"] for x in rep] == [
        "float",
        "pruned 50% unstructured",
        "pruned 50% unstructured + 3 recovery steps",
        "pruned + int8-weight",
        "pruned + int8-dynamic",
    ]
    assert rep[1]["sparsity"] == rep[2]["sparsity"] == 0.5
    for x in rep:
        f = tmp_path / "c" / x["file"]
        assert abs(f.stat().st_size / 2**20 - x["size_mb"]) < 1e-9 and x["latency_ms"] > 0 and 0 <= x["accuracy"] <= 1
    assert rep[3]["size_mb"] < rep[0]["size_mb"] and rep[4]["size_mb"] < rep[0]["size_mb"]
    assert (tmp_path / "c" / "compress.png").stat().st_size > 1000 and (tmp_path / "c" / "report.csv").is_file()
    assert "| stage |" in r.stdout and "| accuracy (test) |" in r.stdout  # where accuracy was measured, said
    assert all(x["split"] == "test" for x in rep)
    m = load_for_inference(tmp_path / "c" / "model_pruned_int8-weight.safetensors")
    assert m.quant == "int8-weight"
    # --force over it: the earlier run's model files go, so the folder holds what its new report lists
    r = run_cli(
        "compress", run, "--out", tmp_path / "c", "--force", "--prune", "none", "--quant", "none", "--repeats", "1"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "c" / "report.json").read_text())["rows"]
    assert sorted(p.name for p in (tmp_path / "c").glob("model_*")) == sorted(x["file"] for x in rep)


def test_compress_bad_input_is_one_line(classifier, pretrained, tmp_path):
    from scaletrain.compress import compress
    from scaletrain.checkpoint import CheckpointError

    run = classifier[0]
    for kw, want in (
        (dict(sparsity=1.0), "must be in [0, 1)"),
        (dict(sparsity=-0.1), "must be in [0, 1)"),
        (
            dict(quant_layers=["wte"]),
            "cannot quantize layer 'wte' (Embedding): torchao int8-weight supports nn.Linear layers only",
        ),
        (dict(quant_layers=["blocks.0.ln_1"]), "cannot quantize layer 'blocks.0.ln_1' (LayerNorm)"),
        (dict(quant=["int4"]), "allowed: int8-weight | int8-dynamic"),
    ):
        with pytest.raises(ConfigError) as e:
            compress(run, tmp_path / "x", **kw)
        assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(CheckpointError) as e:
        compress(pretrained, tmp_path / "x")
    assert "not a fine-tuned classifier" in str(e.value)
    # the command line: one line, exit code 2, nothing written
    r = run_cli("compress", run, "--out", tmp_path / "x", "--sparsity", "1.0")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("scaletrain: error: compress: sparsity=1.0"), (
        r.stderr[-2000:]
    )
    assert not (tmp_path / "x").exists()


def test_compress_measures_where_the_run_kept_data(pets, pretrained, cache_dir, tmp_path):
    """A run fine-tuned without a test split (`finetune.test_fraction=0`): `compress` by default measures on val and
    says so; `--split test` asked for outright is refused in one line, before anything is written."""
    from scaletrain.compress import compress

    s = finetune(
        load_config(
            overrides=ft_overrides(
                tmp_path, pretrained, pets, cache_dir, "run.name=ft", "finetune.test_fraction=0", "train.steps=2"
            )
        )
    )
    run = Path(s["run_dir"])
    r = run_cli("compress", run, "--split", "test", "--out", tmp_path / "c", "--repeats", "1", "--quant", "none")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"scaletrain: error: compress: split=test: {run} has no test split (finetune.test_fraction=0.0); "
        "use split=val or auto"
    ), r.stderr
    assert not (tmp_path / "c").exists()
    rows = compress(run, tmp_path / "c", sparsity=0.3, quant="none", repeats=1, batch=8)
    assert {x["split"] for x in rows} == {"val"}
    assert json.loads((tmp_path / "c" / "report.json").read_text())["split"] == "val"


def test_llama_classifier_pruned_and_quantized_reloads_identically(pets, pretrained_llama, cache_dir, tmp_path):
    "The default family: its blocks' Linear layers (by the spec) pruned exactly, int8 close, export -> load identical."
    from scaletrain.compress import compress
    from scaletrain.models.llama import Llama
    from scaletrain.models.spec import spec_for
    from scaletrain.tasks import ClassificationTask

    s = finetune(load_config(overrides=ft_overrides(tmp_path, pretrained_llama, pets, cache_dir, "run.name=ft")))
    model, cfg = load_classifier(s["run_dir"])
    x = torch.from_numpy(ClassificationTask(cfg).data.x["val"][:16].astype("int64"))
    spec = spec_for(model)
    assert isinstance(model, Llama) and cfg.model.family == "llama"
    pm = copy.deepcopy(model)
    reached = prune_model(pm, 0.5)
    layers = prunable_layers(pm)
    assert len(layers) == 2 * 7 and set(reached) == set(layers)  # wq wk wv wo and SwiGLU's w1 w2 w3, per block
    assert all(n.startswith(spec.block_prefixes(range(2))) for n in layers)
    for n, l in layers.items():
        assert int((l.weight == 0).sum()) == round(0.5 * l.weight.numel()), n
    for n, p in pm.named_parameters():  # embeddings, norms and the head are left alone
        if n.rsplit(".", 1)[0] not in layers:
            assert torch.equal(p, dict(model.named_parameters())[n]), n
    f = export_model(pm, tmp_path / "pruned.safetensors", cfg)
    for mode in QUANT_MODES:
        q = copy.deepcopy(pm)
        quantize(q, mode)
        gap = output_gap(q, pm, x)
        assert gap["rel_diff"] < REL_TOL and gap["agreement"] >= AGREE, (mode, gap)
        fq = export_model(q, tmp_path / f"{mode}.safetensors", cfg, mode)
        assert fq.stat().st_size < 0.75 * f.stat().st_size
        for path, ref in ((f, pm), (fq, q)):
            back = load_for_inference(path)
            with torch.inference_mode():
                assert torch.equal(back(x), ref(x)), path.name
            assert isinstance(back, Llama) and back.labels == ["birds", "cats", "dogs"]
    # the pipeline too: every stage's file loads back as a llama classifier
    rows = compress(s["run_dir"], tmp_path / "c", sparsity=0.5, repeats=1, batch=8)
    assert [r["stage"] for r in rows] == [
        "float",
        "pruned 50% unstructured",
        "pruned + int8-weight",
        "pruned + int8-dynamic",
    ]
    assert rows[1]["sparsity"] == 0.5 and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert load_for_inference(tmp_path / "c" / rows[-1]["file"]).quant == "int8-dynamic"

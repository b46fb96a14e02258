"""Hugging Face checkpoints in and out: tiny random models built and saved by `transformers` itself (nothing is
downloaded) start a run through `model.hf_path`, and `scaletrain export` writes a folder that `from_pretrained` loads
with our logits, our tokenizer's ids and a model card; bad folders are one line, exit 2, nothing written."""

import json
import pytest
import torch
from conftest import run_cli
from scaletrain.checkpoint import load_model_weights
from scaletrain.config import load_config
from scaletrain.data import ByteTokenizer
from scaletrain.models.hub import load_hf
from scaletrain.models.spec import build_model
from hf_family_helpers import byte_decoder

transformers = pytest.importorskip("transformers", reason="transformers is the [hf] extra (pip install -e .[hf])")


def hf_llama(path, tie=False):
    byte_decoder(path, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def hf_gpt2(path):
    cfg = transformers.GPT2Config(vocab_size=260, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    m.save_pretrained(path)
    return m


def logits(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return (out.logits if hasattr(out, "logits") else out).float()


def rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


X = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("make, family", [(hf_llama, "llama"), (hf_gpt2, "gpt")])
def test_a_hugging_face_folder_reads_into_our_family_with_equal_logits(tmp_path, make, family):
    hf = make(tmp_path / "hf")
    ours, mc = load_hf(tmp_path / "hf")
    assert mc.family == family and type(ours) is type(build_model(mc))
    assert rel(logits(hf, X), logits(ours, X)) <= 1e-5


def test_rope_theta_is_read_from_either_way_transformers_writes_it_and_scaling_is_refused(tmp_path):
    "transformers 5 writes RoPE as rope_parameters {rope_theta, rope_type}; 4.x wrote a top-level rope_theta."
    from scaletrain.config import ConfigError

    small = dict(vocab_size=260, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, rope_theta=500000.0)).eval()
    hf.save_pretrained(tmp_path / "theta")
    d = json.loads((tmp_path / "theta" / "config.json").read_text())
    ours, mc = load_hf(tmp_path / "theta")
    assert mc.rope_theta == 500000.0 and rel(logits(hf, X), logits(ours, X)) <= 1e-5
    d.pop("rope_parameters", None)  # the 4.x form of the same config
    d["rope_theta"] = 500000.0
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(d))
    for f in (tmp_path / "theta").glob("*.safetensors"):
        (tmp_path / "old" / f.name).write_bytes(f.read_bytes())
    assert load_hf(tmp_path / "old")[1].rope_theta == 500000.0
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}
    (tmp_path / "old" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="rope_parameters=.*linear.*only plain RoPE"):
        load_hf(tmp_path / "old")


def train(tmp_path, corpus, cache_dir, hf_dir, *extra):
    out = tmp_path / "runs"
    r = run_cli(
        "train",
        f"model.hf_path={hf_dir}",
        f"data.source={corpus}",
        f"data.cache_dir={cache_dir}",
        f"run.out_dir={out}",
        "run.name=r",
        "train.device=cpu",
        "train.steps=3",
        "train.warmup_steps=0",
        "train.micro_batch=2",
        "train.eval_every=3",
        "train.eval_iters=1",
        *extra,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "r"


def test_hf_to_scaletrain_train_export_from_pretrained_round_trip(tmp_path, corpus, cache_dir):
    hf = hf_gpt2(tmp_path / "hf")
    run = train(tmp_path, corpus, cache_dir, tmp_path / "hf")
    cfg = load_config(run / "config.yaml")
    assert (cfg.model.family, cfg.model.n_layer, cfg.model.vocab_size) == ("gpt", 2, 260)
    r = run_cli("export", run, tmp_path / "export")
    assert r.returncode == 0 and "logits equal to ours" in r.stdout, r.stderr[-2000:]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ours = build_model(cfg.model)
    load_model_weights(run, ours)
    assert rel(logits(ours, X), logits(back, X)) <= 1e-5  # the exported folder is our trained model
    assert rel(logits(hf, X), logits(back, X)) > 1e-4  # and it trained: not the starting weights
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "def f(x):\n    return 'ünï' + x\n"
    assert tok(text)["input_ids"] == ByteTokenizer().encode(text)
    card = (tmp_path / "export" / "README.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert "| steps | 3 |" in card and f"| tokens seen | {summary['tokens']:,} |" in card
    assert f"{summary['final_val_loss']:.4f}" in card and "hf_path" in card


def test_a_run_starts_from_the_folders_weights_exactly(tmp_path, corpus, cache_dir):
    hf = hf_llama(tmp_path / "hf", tie=True)
    run = train(tmp_path, corpus, cache_dir, tmp_path / "hf", "train.lr=0", "train.weight_decay=0")
    assert run_cli("export", run, tmp_path / "export").returncode == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    want, got = hf.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def one_line_exit_2(r, *expect):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    errs = [l for l in r.stderr.splitlines() if l.startswith("scaletrain: error: ")]
    assert len(errs) == 1 and all(e in errs[0] for e in expect), r.stderr[-2000:]


def test_bad_hugging_face_folders_are_one_line_and_write_nothing(tmp_path, corpus, cache_dir):
    hf_llama(tmp_path / "good")
    cases = {}
    (tmp_path / "empty").mkdir()
    cases["empty"] = ("no config.json",)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    cases["noweights"] = ("no model.safetensors",)
    from safetensors.torch import load_file, save_file

    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    sd = load_file(str(tmp_path / "good" / "model.safetensors"))
    sd.pop("model.layers.1.mlp.down_proj.weight")
    save_file(sd, str(tmp_path / "missing" / "model.safetensors"))
    cases["missing"] = ("model.layers.1.mlp.down_proj.weight",)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases["bert"] = ("model_type='bert'", "llama")
    out = tmp_path / "runs"
    for name, expect in cases.items():
        r = run_cli("train", f"model.hf_path={tmp_path / name}", f"data.source={corpus}", f"run.out_dir={out}")
        one_line_exit_2(r, *expect)
        assert not out.exists() or not any(out.iterdir()), name
    r = run_cli("train", f"model.hf_path={tmp_path / 'good'}", "model.n_layer=3", f"run.out_dir={out}")
    one_line_exit_2(r, "model.n_layer=3", "n_layer=2")
    assert not out.exists() or not any(out.iterdir())


def test_export_never_overwrites_without_force(tmp_path, corpus, cache_dir):
    hf_llama(tmp_path / "hf")
    run = train(tmp_path, corpus, cache_dir, tmp_path / "hf")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "keep.txt").write_text("mine")
    one_line_exit_2(run_cli("export", run, tmp_path / "export"), "already exists")
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["keep.txt"]
    r = run_cli("export", run, tmp_path / "export", "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not list(tmp_path.glob(".export.*"))  # no temporary folder left beside it


def test_shorter_sequences_than_the_folders_maximum(tmp_path, corpus, cache_dir):
    "Rotary positions: block_size 16 on a 32-position Llama trains the same weights; GPT-2's position table refuses."
    hf = hf_llama(tmp_path / "hf", tie=True)
    run = train(
        tmp_path, corpus, cache_dir, tmp_path / "hf", "model.block_size=16", "train.lr=0", "train.weight_decay=0"
    )
    assert load_config(run / "config.yaml").model.block_size == 16
    assert run_cli("export", run, tmp_path / "export").returncode == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    want, got = hf.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # the exported model keeps the folder's maximum length, not the shorter one it was trained on
    assert back.config.max_position_embeddings == 32
    assert json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())["model_max_length"] == 32
    (tmp_path / "hf").rename(tmp_path / "moved")  # the folder moves: the run resumes from its copy of config.json
    r = run_cli("train", "--resume", run, "train.steps=4")
    assert r.returncode == 0 and "hf_config" in r.stdout + r.stderr, r.stderr[-3000:]
    hf_gpt2(tmp_path / "gpt")
    out = tmp_path / "gpt_runs"
    r = run_cli(
        "train",
        f"model.hf_path={tmp_path / 'gpt'}",
        "model.block_size=16",
        f"data.source={corpus}",
        f"run.out_dir={out}",
    )
    one_line_exit_2(r, "model.block_size=16", "block_size=32")
    assert "a smaller one" not in r.stderr and (not out.exists() or not any(out.iterdir()))


def test_pipeline_takes_an_untied_folder_and_refuses_a_tied_one(tmp_path):
    "The folder's config.json decides the tie, not the config's default (model.tie_weights=true)."
    from scaletrain.config import ConfigError
    from scaletrain.models.hub import resolve_hf

    hf_llama(tmp_path / "untied", tie=False)
    hf_llama(tmp_path / "tied", tie=True)
    for family in ("llama", "hf"):
        ov = [f"model.family={family}", "parallel.pp=2"]
        cfg = resolve_hf(load_config(overrides=[*ov, f"model.hf_path={tmp_path / 'untied'}"]))
        assert cfg.model.tie_weights is False and cfg.parallel.pp == 2
        with pytest.raises(ConfigError, match="parallel.pp=2 with model.hf_path=.*ties the embedding"):
            resolve_hf(load_config(overrides=[*ov, f"model.hf_path={tmp_path / 'tied'}"]))


def test_a_model_key_typed_at_its_default_value_must_agree_with_the_folder(tmp_path):
    "model.n_layer=4 is 4 by default too: typed on the command line, it is the user's, not silently the folder's 2."
    from scaletrain.config import ConfigError
    from scaletrain.jobs import prepare_run

    hf_llama(tmp_path / "hf")
    base = [f"model.hf_path={tmp_path / 'hf'}", f"run.out_dir={tmp_path / 'runs'}", "train.device=cpu"]
    for typed, says in (("model.n_layer=4", "model.n_layer=4 but"), ("model.tie_weights=true", "tie_weights=True but")):
        with pytest.raises(ConfigError, match=says):
            prepare_run(None, [*base, typed])
    assert not (tmp_path / "runs").exists()


def test_a_folder_with_a_nan_weight_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file
    from scaletrain.errors import CheckpointError

    hf_llama(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(f))
    sd["model.norm.weight"][0] = float("nan")
    save_file(sd, str(f), {"format": "pt"})
    with pytest.raises(CheckpointError, match="tensor model.norm.weight holds NaN or Inf values"):
        load_hf(tmp_path / "hf")

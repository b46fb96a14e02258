"""The model families and their specs: every family builds and counts its own parameters; the state-dict adapters turn
weights of Hugging Face's models (built here with `transformers` itself, saved and read back locally) into ours with
equal logits, and ours back into theirs."""

import pytest
import torch
from scaletrain.config import ModelConfig, load_config
from scaletrain.errors import ConfigError
from scaletrain.models.spec import build_model, get_spec
from scaletrain.registry import shape_families

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency (pip install -e .[dev])")


# families built from the config's shape alone; `hf` builds a saved transformers folder (tests/test_hf_family.py)
FROM_SHAPE = shape_families()


@pytest.mark.parametrize("family", FROM_SHAPE)
@pytest.mark.parametrize("bias,tie", [("true", "true"), ("false", "false")])
@pytest.mark.parametrize("fused", ["false", "true"], ids=["qkv", "fused_qkv"])
def test_every_family_builds_and_its_shape_counts_its_parameters(family, bias, tie, fused):
    "What the estimator counts (parameters, tensors, per block and in all) is what the built model holds."
    ov = [
        f"model.family={family}",
        "model.vocab_size=300",
        "model.n_layer=3",
        f"model.bias={bias}",
        f"model.tie_weights={tie}",
        f"model.fused_qkv={fused}",
    ]
    c = load_config(overrides=ov).model
    m = build_model(c)
    spec, sh = get_spec(family), get_spec(family).shape(c)
    unique = {id(p): p for p in m.parameters()}.values()
    assert sum(p.numel() for p in unique) == sh.n_params() and len(unique) == sh.n_tensors(sh.n_layer)
    assert sum(p.numel() for p in spec.block_modules(m)["0"].parameters()) == sh.block_params()
    assert spec.depth(m) == 3 and m(torch.randint(0, 300, (2, 16))).shape == (2, 16, 300)


def _hf_llama(tmp_path, tie: bool, bias: bool):
    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")  # nothing is downloaded: a local folder, as save_pretrained writes it
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = ModelConfig(
        family="llama",
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        ffn_dim=96,
        block_size=64,
        vocab_size=300,
        tie_weights=tie,
        bias=bias,
    )
    return back, ours


def _hf_gpt2(tmp_path):
    cfg = transformers.GPT2Config(
        vocab_size=300,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    return back, ModelConfig(family="gpt", n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=300, bias=True)


CASES = [("llama", dict(tie=False, bias=False)), ("llama", dict(tie=True, bias=True)), ("gpt", {})]


@pytest.mark.parametrize("fused", [False, True], ids=["qkv", "fused_qkv"])
@pytest.mark.parametrize("family,kw", CASES, ids=["llama-gqa", "llama-tied-bias", "gpt2"])
def test_hugging_face_weights_give_our_model_the_same_logits(tmp_path, family, kw, fused):
    "Either layout of ours (separate or fused q/k/v) reads and writes the same Hugging Face weights."
    hf, c = _hf_llama(tmp_path, **kw) if family == "llama" else _hf_gpt2(tmp_path)
    c.fused_qkv = fused
    spec = get_spec(family)
    shape = spec.shape(c)
    ours = build_model(c).eval()
    ours.load_state_dict(spec.adapter.from_hf(hf.state_dict(), shape), strict=True)
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()), (a - b).abs().max()
    # and ours back into theirs: a strict load, the same logits
    fresh = type(hf)(hf.config).eval()
    missing, unexpected = fresh.load_state_dict(spec.adapter.to_hf(ours.state_dict(), shape), strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "masked_bias")) for k in missing), (missing, unexpected)
    with torch.no_grad():
        assert torch.allclose(fresh(x).logits, b, atol=1e-5)
    # the config the adapter writes describes the same model to transformers
    hc = spec.adapter.hf_config(shape, eps=c.norm_eps)
    rebuilt = transformers.AutoConfig.for_model(**hc)
    for k in ("vocab_size", "tie_word_embeddings"):
        assert getattr(rebuilt, k) == getattr(hf.config, k), k


def test_an_adapter_refuses_keys_it_does_not_know():
    c = ModelConfig(family="llama", n_layer=1, n_embd=32, n_head=2, vocab_size=300)
    spec = get_spec("llama")
    sd = build_model(c).state_dict()
    with pytest.raises(ConfigError, match="unexpected keys"):
        spec.adapter.to_hf({**sd, "extra.weight": torch.zeros(1)}, spec.shape(c))
    hf = spec.adapter.to_hf(sd, spec.shape(c))
    del hf["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(ConfigError, match="has no 'model.layers.0.self_attn.q_proj.weight'"):
        spec.adapter.from_hf(hf, spec.shape(c))

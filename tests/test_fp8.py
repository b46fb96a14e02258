"""fp8 training: refused in one line where there are no float8 tensor cores (this CPU), and the conversion that a GPU
run applies: the blocks' Linear layers become torchao's Float8Linear, the output head does not."""

import pytest
import torch
from conftest import run_cli, tiny
from scaletrain.config import load_config
from scaletrain.models.spec import build_model, get_spec
from scaletrain.precision import apply_float8, autocast_ctx, float8_refusal


def test_fp8_is_refused_on_cpu_in_one_line_and_nothing_is_written(tmp_path, corpus, cache_dir):
    out = tmp_path / "runs"
    r = run_cli("train", *tiny(corpus, cache_dir, out, "memory.precision=fp8-mixed"))
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("scaletrain: error: config: memory.precision=fp8-mixed") and "8.9" in last
    assert "Traceback" not in r.stderr and (not out.exists() or not any(out.iterdir()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the device decides")
def test_the_library_refuses_too():
    assert "compute capability" in float8_refusal("fp8-mixed", "cpu")
    assert float8_refusal("bf16-mixed", "cpu") is None


def test_the_conversion_swaps_the_block_linears_and_keeps_the_head():
    cfg = load_config(overrides=["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.vocab_size=320"])
    model = build_model(cfg.model)
    spec = get_spec("llama")
    x = torch.randint(0, 320, (2, 16))
    with autocast_ctx("bf16-mixed", torch.device("cpu")):
        ref = model(x).float()
    done = apply_float8(model, "rowwise", skip=(spec.head,))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if "Linear" in type(m).__name__}
    assert kinds[spec.head] == "Linear" and spec.head not in done
    assert len(done) == 2 * 7 and all(kinds[n] == "Float8Linear" for n in done)  # q, k, v, o, w1, w2, w3 per block
    with autocast_ctx("fp8-mixed", torch.device("cpu")):
        out = model(x).float()
    assert ((out - ref).norm() / ref.norm()).item() < 0.05  # float8 rounding, not another model

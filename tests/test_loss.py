"""The chunked output-layer cross-entropy: equal to F.cross_entropy on the full logits (values and gradients, fp32
1e-6), and never creating a tensor as large as (tokens, vocab)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from scaletrain.models.loss import chunked_cross_entropy


def case(N=257, D=48, V=1500, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    W = (torch.randn(V, D, generator=g) * 0.2).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, W, y


@pytest.mark.parametrize("chunk", [1, 64, 100, 257, 4096])
def test_equal_to_cross_entropy_values_and_gradients_fp32(chunk):
    h, W, y = case()
    ref = F.cross_entropy(h @ W.t(), y)
    gh, gw = torch.autograd.grad(ref, (h, W))
    out = chunked_cross_entropy(h, W, y, chunk=chunk)
    ch, cw = torch.autograd.grad(out * 3.0, (h, W))  # an upstream gradient other than 1 is applied too
    assert abs(out.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(ch, 3.0 * gh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cw, 3.0 * gw, atol=1e-6, rtol=1e-5)


def test_batched_shapes_and_a_tied_matrix_used_twice():
    h, W, y = case(N=6 * 20, ignore_every=0)
    h3, y3 = h.reshape(6, 20, -1), y.reshape(6, 20)
    emb = lambda: F.embedding(torch.arange(3), W).sum()  # the same matrix also serves as an embedding
    ref = F.cross_entropy((h3 @ W.t()).reshape(-1, W.shape[0]), y3.reshape(-1)) + emb()
    out = chunked_cross_entropy(h3, W, y3, chunk=32) + emb()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    got, want = torch.autograd.grad(out, W)[0], torch.autograd.grad(ref, W)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    "Records the largest number of elements of any tensor an op creates."

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_creates_the_full_logits():
    N, V, chunk = 512, 3000, 64
    h, W, y = case(N=N, V=V)
    with LargestTensor() as m:
        loss = chunked_cross_entropy(h, W, y, chunk=chunk)
        loss.backward()
    assert m.largest <= chunk * V < N * V  # one chunk's logits at most
    with LargestTensor() as full:
        F.cross_entropy(h @ W.t(), y).backward()
    assert full.largest >= N * V  # what the plain loss holds


def test_evaluation_computes_the_loss_only():
    h, W, y = case()
    with torch.no_grad():
        out = chunked_cross_entropy(h, W, y, chunk=50)
    assert not out.requires_grad
    assert abs(out.item() - F.cross_entropy(h @ W.t(), y).item()) <= 1e-6


def test_bf16_hidden_states_get_fp32_logits():
    h, W, y = case(ignore_every=0)
    hb, Wb = h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    ref = F.cross_entropy((hb @ Wb.t()).float(), y)
    out = chunked_cross_entropy(hb, Wb, y, chunk=40)
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) <= 1e-3
    out.backward()
    assert hb.grad.dtype == torch.bfloat16 and Wb.grad.dtype == torch.bfloat16


def test_bad_chunk_is_refused():
    h, W, y = case()
    with pytest.raises(ValueError, match="chunk=0"):
        chunked_cross_entropy(h, W, y, chunk=0)


# ---- wired into training: memory.chunked_loss ----

CHUNKED = [
    "memory.chunked_loss=on",
    "memory.loss_chunk=16",
    "model.vocab_size=2000",
]  # 2,000 ids: logits worth chunking


def _fit(corpus, cache_dir, out, *extra):
    from conftest import tiny
    from scaletrain.config import load_config
    from scaletrain.train import Trainer

    ov = tiny(corpus, cache_dir, out, "train.steps=4", "train.eval_every=0", "train.ckpt_every=0", *extra)
    t = Trainer(load_config(overrides=ov), default_callbacks=False)
    t.fit()
    return t


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_the_trainer_with_the_chunked_loss_trains_as_with_full_logits(corpus, cache_dir, tmp_path, family):
    on = _fit(corpus, cache_dir, tmp_path, f"model.family={family}", *CHUNKED)
    off = _fit(corpus, cache_dir, tmp_path, f"model.family={family}", *CHUNKED[1:], "memory.chunked_loss=off")
    assert on.engine.loss_chunk == 16 and off.engine.loss_chunk == 0
    a, b = [r["loss"] for r in on.history], [r["loss"] for r in off.history]
    assert a == pytest.approx(b, rel=1e-6) and a[-1] < a[0]
    assert on.last_val == pytest.approx(off.last_val, rel=1e-6)  # evaluation goes through it too (no gradients)
    # the gradients of one more step, through each engine's forward_loss (weights after Adam are not compared: its
    # first steps are ~lr * sign(g), so rounding on a near-zero gradient can flip a weight by 2 lr)
    off.model.load_state_dict(on.model.state_dict())
    x, y = on.micro_batches(0)[0]
    grads = []
    for t in (on, off):
        t.engine.zero_grad()
        t.engine.forward_loss(x, y).backward()
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters()})
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], rtol=1e-5, atol=1e-7), n


def test_on_under_compile_chunks_the_loss_beside_the_compiled_blocks(corpus, cache_dir, tmp_path):
    # train.compile with memory.chunked_loss=on: the blocks compiled, the loss in chunks, the numbers of the full loss
    on = _fit(corpus, cache_dir, tmp_path, *CHUNKED, "train.compile=true")
    off = _fit(corpus, cache_dir, tmp_path, *CHUNKED[1:], "memory.chunked_loss=auto", "train.compile=true")
    assert on.engine.loss_chunk == 16 and off.engine.loss_chunk == 0  # auto stays off under compile
    a, b = [r["loss"] for r in on.history], [r["loss"] for r in off.history]
    assert a == pytest.approx(b, rel=1e-5) and a[-1] < a[0]


def test_auto_turns_it_on_only_where_it_saves_memory():
    from scaletrain.config import load_config
    from scaletrain.models.loss import loss_chunk

    assert loss_chunk(load_config()) == 0  # the byte-level default: a micro-batch's logits fit one chunk
    big = ["model.vocab_size=50257", "model.block_size=1024", "train.micro_batch=8"]
    assert loss_chunk(load_config(overrides=big)) == 1024
    pp = ["parallel.pp=2", "model.tie_weights=false"]
    for off in (["parallel.tp=2"], pp, ["train.compile=true"], ["memory.chunked_loss=off"]):
        assert loss_chunk(load_config(overrides=big + off)) == 0, off
    assert loss_chunk(load_config(overrides=big + ["memory.loss_chunk=100"])) == 100


def test_fsdp_with_the_chunked_loss_equals_one_process_with_full_logits(corpus, cache_dir, tmp_path):
    "The head's weight is gathered inside the model's own forward (its loss_head), so FSDP2 shards it as usual."
    from test_parallel import assert_equivalent, launch, reference, results

    ov = ["parallel.strategy=fsdp", *CHUNKED]
    out = launch(2, [dict(name="chunked", overrides=ov)], corpus, cache_dir, tmp_path / "dist")
    ref, ref_w = reference(corpus, cache_dir, tmp_path, [*CHUNKED[1:], "memory.chunked_loss=off"], dp=2)
    assert_equivalent(results(out, "chunked", 2), ref, ref_w, rtol=1e-5)


def test_ddp_with_the_whole_model_compiled_equals_one_process(corpus, cache_dir, tmp_path):
    "train.compile_scope=model under DDP: the compiled model (its loss inside) wrapped by DDP trains as one process."
    from test_parallel import assert_equivalent, launch, reference, results

    ov = ["parallel.strategy=ddp", "train.compile=true", "train.compile_scope=model"]
    out = launch(2, [dict(name="whole", overrides=ov)], corpus, cache_dir, tmp_path / "dist")
    ref, ref_w = reference(corpus, cache_dir, tmp_path, [], dp=2)
    assert_equivalent(results(out, "whole", 2), ref, ref_w, rtol=1e-4)


def test_on_where_it_cannot_run_is_one_line_and_writes_nothing(corpus, cache_dir, tmp_path):
    from conftest import run_cli, tiny

    out = tmp_path / "runs"
    r = run_cli("train", "--nproc", "2", *tiny(corpus, cache_dir, out, "parallel.tp=2", "memory.chunked_loss=on"))
    errs = [l for l in r.stderr.splitlines() if l.startswith("scaletrain: error: ")]
    assert r.returncode == 2 and len(errs) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "memory.chunked_loss=on" in errs[0] and "parallel.tp=2" in errs[0]
    assert not out.exists() or not any(out.iterdir())


def test_the_estimate_counts_one_chunk_not_the_logits():
    from scaletrain.config import load_config
    from scaletrain.memory import estimate, estimate_config

    big = ["model.vocab_size=50257", "model.block_size=1024", "train.micro_batch=8", "memory.precision=bf16-mixed"]
    full = estimate_config(load_config(overrides=big + ["memory.chunked_loss=off"]))
    part = estimate_config(load_config(overrides=big))
    assert part.total < full.total and part.temporary < full.temporary / 4, (part.parts(), full.parts())
    cfg = load_config(overrides=big)
    same = estimate(cfg, precision="bf16-mixed", micro_batch=8, loss_chunk=1024)
    assert same.total == part.total

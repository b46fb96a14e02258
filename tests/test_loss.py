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

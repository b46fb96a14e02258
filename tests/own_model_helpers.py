"""User-written models, optimizers and one training loop on `scaletrain.loop.setup`, shared by test_own_model.py
(one process, the reference) and own_model_worker.py (the same loop under torchrun)."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from scaletrain.loop import setup, split_batch

# ---------------------------------------------------------------- a Llama written by a user, with its own names


class RMS(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.scale, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def rotate(x, base=10000.0):
    "Rotary positions on (B, T, H, D); heads are counted from the tensor, so a tensor-parallel shard works too."
    T, D = x.size(1), x.size(-1)
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32, device=x.device) / D)
    ang = torch.outer(torch.arange(T, dtype=torch.float32, device=x.device), inv)[None, :, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()), -1).flatten(-2).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, d, n_head, n_kv):
        super().__init__()
        self.hd = d // n_head
        self.wq, self.wk = nn.Linear(d, d, bias=False), nn.Linear(d, n_kv * self.hd, bias=False)
        self.wv, self.wo = nn.Linear(d, n_kv * self.hd, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = rotate(self.wq(x).view(B, T, -1, self.hd))
        k = rotate(self.wk(x).view(B, T, -1, self.hd))
        v = self.wv(x).view(B, T, -1, self.hd)
        rep = q.size(2) // k.size(2)
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class GatedMLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate, self.up, self.down = (
            nn.Linear(d, hidden, bias=False),
            nn.Linear(d, hidden, bias=False),
            nn.Linear(hidden, d, bias=False),
        )

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nn.Module):
    def __init__(self, d, n_head, n_kv, hidden):
        super().__init__()
        self.pre_attn, self.attn = RMS(d), SelfAttention(d, n_head, n_kv)
        self.pre_mlp, self.mlp = RMS(d), GatedMLP(d, hidden)

    def forward(self, x):
        x = x + self.attn(self.pre_attn(x))
        return x + self.mlp(self.pre_mlp(x))


class MyLlama(nn.Module):
    def __init__(self, vocab=64, d=32, n_layer=4, n_head=4, n_kv=2, hidden=64):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([DecoderLayer(d, n_head, n_kv, hidden) for _ in range(n_layer)])
        self.final_norm = RMS(d)
        self.lm = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        h = self.tokens(idx)
        for layer in self.layers:
            h = layer(h)
        return self.lm(self.final_norm(h))


# the user's tensor-parallel plan (paths inside a DecoderLayer) and pipeline cut
LLAMA_TP = {
    "attn.wq": "colwise",
    "attn.wk": "colwise",
    "attn.wv": "colwise",
    "attn.wo": "rowwise",
    "mlp.gate": "colwise",
    "mlp.up": "colwise",
    "mlp.down": "rowwise",
}
LLAMA_PP = ["layers.2"]

# ---------------------------------------------------------------- a small ViT: patches -> encoder blocks -> classifier


class EncoderBlock(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    def __init__(self, image=16, patch=4, d=32, depth=3, n_head=4, classes=5):
        super().__init__()
        self.patchify = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.encoder = nn.ModuleList([EncoderBlock(d, n_head) for _ in range(depth)])
        self.norm, self.classifier = nn.LayerNorm(d), nn.Linear(d, classes)
        # fp32 buffers, as image models keep them: under FSDP2's bf16 weights only autocast keeps the conv one dtype
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))

    def forward(self, images):
        x = self.patchify((images - self.mean) / self.std).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], 1) + self.pos
        for blk in self.encoder:
            x = blk(x)
        return self.classifier(self.norm(x[:, 0]))


# ---------------------------------------------------------------- the user's optimizers: their class must step


class CountingAdamW(torch.optim.AdamW):
    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.n_steps = 0

    def step(self, closure=None):
        self.n_steps += 1
        return super().step(closure)


class ClampedAdamW(CountingAdamW):
    "A constructor argument kept outside `defaults` (an attribute): a rebuild from the defaults would reset it."

    def __init__(self, params, max_update=0.01, **kw):
        super().__init__(params, **kw)
        self.max_update = max_update


class CountingSGD(torch.optim.SGD):
    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.n_steps = 0

    def step(self, closure=None):
        self.n_steps += 1
        return super().step(closure)


ADAMW = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05)
SGD = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)


def user_optimizer(kind, model):
    "The user's optimizer with two groups (no decay for 1-D tensors), hyper-parameters of their own."
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    if kind == "llama":
        return CountingAdamW([dict(params=decay), dict(params=rest, weight_decay=0.0)], **ADAMW)
    return CountingSGD([dict(params=decay), dict(params=rest, weight_decay=0.0)], **SGD)


# ---------------------------------------------------------------- data and the loop

STEPS, BATCH = 4, 8


def global_batches(kind, steps=STEPS, seed=0):
    "The same global batches on every rank: a dict for the llama (tokens), a tuple for the ViT (images, labels)."
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        if kind == "llama":
            t = torch.randint(0, 64, (BATCH, 17), generator=g)
            out.append({"input_ids": t[:, :-1], "labels": t[:, 1:]})
        else:
            out.append((torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (BATCH,), generator=g)))
    return out


def lm_loss(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def build(kind):
    torch.manual_seed(0)
    if kind == "mlp":  # no repeated blocks at all: trains where nothing works block by block (ddp, zero1)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 5))
    return MyLlama() if kind == "llama" else TinyViT()


def run_case(
    kind,
    overrides,
    accum=1,
    steps=STEPS,
    sched=False,
    tp_plan=None,
    pp_rows=None,
    nan_at=None,
    opt=None,
    spare=False,
    pp_split=None,
    sched_after=False,
):
    """Train `kind` with the user's loop under `overrides` on this job's processes. Returns per-step losses (global
    means), the whole model's final weights this rank sees, the local optimizer's class / step count / groups, and
    how often the blocks' forward ran. `nan_at`: at that step the last rank passes `loop.step` its own loss plus NaN
    (the others a finite one). `spare`: the model has a parameter its forward never uses."""
    model = build(kind)
    if spare:
        model.spare = nn.Linear(2, 2)
    calls = [0]
    container = {"llama": "layers", "vit": "encoder"}.get(kind)
    container = getattr(model, container) if container else []
    for blk in container:
        blk.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    pp = any(o.startswith("parallel.pp=") and not o.endswith("=1") for o in overrides)
    tp = any(o.startswith("parallel.tp=") and not o.endswith("=1") for o in overrides)
    batches = global_batches(kind, steps)
    extra = {}
    if tp:
        extra["tp_plan"] = tp_plan or LLAMA_TP  # tp_plan: a plan of the user's that pairs layers wrongly
    if pp:  # pp_rows: an example batch shaped unlike the ones the loop steps with
        extra.update(pp_split=pp_split or LLAMA_PP, pp_example=batches[0]["input_ids"][:pp_rows], loss_fn=lm_loss)
    opt = ClampedAdamW(model.parameters(), max_update=0.5, **ADAMW) if opt == "clamped" else user_optimizer(kind, model)
    # sched: a learning-rate scheduler built on the user's optimizer before setup, as any PyTorch script does
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s) if sched else None
    loop = setup(model, opt, overrides=["train.device=cpu", *overrides], verbose=False, **extra)
    if sched_after:  # on the object given, after setup: under ZeRO it is not the one that steps
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    losses, norms = [], []
    for batch in batches:
        local = loop.shard(batch)  # this data-parallel rank's part (tensor-parallel ranks share it)
        total = 0.0
        for i in range(accum):
            mb = _micro(local, accum, i)
            if loop.pipelined:
                total += float(loop.pipeline_step(mb["input_ids"], mb["labels"], accum=accum)) / accum
                continue
            with loop.accumulate(last=i == accum - 1):
                with loop.autocast():
                    if kind == "llama":
                        loss = lm_loss(loop.model(mb["input_ids"]), mb["labels"])
                    else:
                        loss = F.cross_entropy(loop.model(mb[0]).float(), mb[1])
                loop.backward(loss / accum)
            total += float(loop.reduce(loss)) / accum
        norms.append(float(loop.clip_grad_norm(1.0)))
        if nan_at is None:
            loop.step()
        else:  # this rank's unreduced loss: NaN on one rank only
            bad = len(losses) == nan_at and loop.rank == loop.world_size - 1
            loop.step(loss.detach() + (float("nan") if bad else 0.0))
        if schedule is not None:
            schedule.step()
        losses.append(total)
    user_object = loop.optimizer is opt
    opt = loop.local_optimizer()
    held = loop.engine.state_bytes()["params"]  # this rank's share (a DTensor counts its local shard)
    return dict(
        param_bytes=held,
        losses=losses,
        grad_norms=norms,
        weights={k: v.float() for k, v in loop.full_state_dict().items()},
        optimizer=type(opt).__name__,
        optimizer_module=type(opt).__module__,
        steps_taken=opt.n_steps,
        groups=[{k: v for k, v in g.items() if k != "params"} | {"n": len(g["params"])} for g in opt.param_groups],
        block_calls=calls[0],
        n_blocks=len(container),
        engine=loop.engine.name,
        loss_scale=loop.engine.scaler.get_scale() if loop.engine.scaler is not None else None,
        dp=loop.dp_size,
        user_object=user_object,  # whether the optimizer that steps is the object the user built
    )


def _micro(batch, n, i):
    return split_batch(batch, n, i) if n > 1 else batch

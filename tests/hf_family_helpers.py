"""Tiny `transformers` models (a Llama and a GPT-2, built from configs and saved with `save_pretrained`) trained with
the user's own loop on `scaletrain.loop.setup`; shared by test_hf_family.py (one process, the reference) and
hf_family_worker.py (the same loop under torchrun)."""

import torch
from scaletrain.loop import setup
from own_model_helpers import STEPS, global_batches, lm_loss, user_optimizer

VOCAB = 64


def save_tiny(kind, folder, vocab=VOCAB):
    """A tiny random `kind` model (hf_llama | hf_gpt2 tied | hf_gpt2u untied) saved as a save_pretrained folder
    (`vocab` >= 257 for a run of scaletrain's byte tokenizer)."""
    import transformers

    if kind == "hf_llama":
        return byte_decoder(folder, vocab_size=vocab, intermediate_size=64, num_hidden_layers=4)
    torch.manual_seed(0)
    c = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=4,
        n_head=4,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=kind == "hf_gpt2",
        bos_token_id=0,
        eos_token_id=0,
    )
    m = transformers.GPT2LMHeadModel(c)
    m.save_pretrained(folder)
    return folder


def byte_decoder(folder, kind="Llama", **sizes):
    """A tiny transformers decoder of the Llama layout (`kind`: Llama, or Qwen2: biases on q/k/v) with room for the
    byte tokenizer's 257 ids; `sizes` replace its config's defaults here."""
    import transformers

    c = getattr(transformers, f"{kind}Config")(
        **dict(
            vocab_size=260,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=False,
        )
        | sizes
    )
    torch.manual_seed(0)
    getattr(transformers, f"{kind}ForCausalLM")(c).save_pretrained(folder)
    return folder


def load(folder):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    m = transformers.AutoModelForCausalLM.from_pretrained(folder).float()  # (dtype= is torch_dtype= before 4.56)
    m.config.use_cache = False
    return m.train()


def blocks_of(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def run_case(folder, overrides, steps=STEPS):
    """Train the saved model with the user's loop (AdamW of the user's class) under `overrides`; per-step losses,
    grad norms, the final whole-model weights this rank sees, and how often the blocks' forward ran."""
    model = load(folder)
    calls = [0]
    for blk in blocks_of(model):
        blk.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    batches = global_batches("llama", steps)
    pp = any(o.startswith("parallel.pp=") and not o.endswith("=1") for o in overrides)
    extra = dict(loss_fn=lm_loss) if pp else {}
    loop = setup(
        model, user_optimizer("llama", model), overrides=["train.device=cpu", *overrides], verbose=False, **extra
    )
    losses, norms = [], []
    for batch in batches:
        mb = loop.shard(batch)
        if loop.pipelined:
            loss = loop.pipeline_step(mb["input_ids"], mb["labels"])
        else:
            with loop.autocast():
                # a dict batch with its attention mask, `use_cache=False`, the loss from `.logits`
                out = loop.model(input_ids=mb["input_ids"], attention_mask=torch.ones_like(mb["input_ids"]))
                loss = lm_loss(out.logits, mb["labels"])
            loop.backward(loss)
            loss = loop.reduce(loss)
        norms.append(float(loop.clip_grad_norm(1.0)))
        loop.step()
        losses.append(float(loss))
    opt = loop.local_optimizer()
    return dict(
        losses=losses,
        grad_norms=norms,
        weights={k: v.float() for k, v in loop.full_state_dict().items()},
        optimizer=type(opt).__name__,
        steps_taken=opt.n_steps,
        block_calls=calls[0],
        n_blocks=len(blocks_of(model)),
        engine=loop.engine.name,
        param_bytes=loop.engine.state_bytes()["params"],
        dp=loop.dp_size,
        describe=loop.spec.describe(),
    )

"""Pretraining before and after `scaletrain data prepare`, at the same token budget, on the same held-out files.

Three training sets: the raw stdlib, the prepared one (default rules and deduplication) and the prepared one with
`prep.decontaminate=true`. The same small GPT is trained on each for the same steps (the same tokens), for each
seed. The prepared datasets keep the stdlib's held-out files untouched, so every model is evaluated on the same
files: all of them, and the subset that passes the default rules (the held-out files a cleaned training set is meant
for). Every window of 64 tokens of the held-out stream is evaluated, so the numbers are exact, not sampled.

    .venv/bin/python benchmarks/data_before_after.py [--steps 2000] [--seeds 1,2,3] [--work /tmp/before_after]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepared(work: Path, name: str, *overrides) -> Path:
    out = work / name
    cmd = [
        sys.executable,
        "-m",
        "scaletrain.cli",
        "data",
        "prepare",
        "stdlib",
        *overrides,
        "--out",
        str(out),
        "--quiet",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return next(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def held_out_streams(ds: Path):
    "Byte tokens (an end-of-text id after each file) of all held-out files, and of those that pass the rules."
    from scaletrain.config import DataPrepConfig
    from scaletrain.data import documents, stdlib_root
    from scaletrain.dataprep import RULES, rule_names

    p = DataPrepConfig()
    rules = [RULES[n][0] for n in rule_names(p)]
    full, clean, n_full, n_clean = [], [], 0, 0
    man = json.loads((ds / "manifest.json").read_text())
    for v in man["shards"]["val"]:
        for line in open(ds / v):
            f = stdlib_root() / json.loads(line)["id"].split(":", 1)[1]
            for b in documents(f):
                toks = list(b) + [256]
                full += toks
                n_full += 1
                if not any(fn(b, b.decode("utf-8", errors="replace"), p) for fn in rules):
                    clean += toks
                    n_clean += 1
    return (full, n_full), (clean, n_clean)


@torch.no_grad()
def loss(model, stream, T: int = 64) -> float:
    a = torch.tensor(stream[: (len(stream) - 1) // T * T + 1])
    x, y = a[:-1].view(-1, T), a[1:].view(-1, T)
    tot = 0.0
    for i in range(0, len(x), 256):
        lo = model(x[i : i + 256]).float()
        tot += F.cross_entropy(lo.reshape(-1, lo.shape[-1]), y[i : i + 256].reshape(-1), reduction="sum").item()
    return tot / y.numel()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--work", default="/tmp/before_after")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_before_after.json"))
    a = ap.parse_args()
    from scaletrain import checkpoint as ck
    from scaletrain.config import load_config
    from scaletrain.models.spec import build_model
    from scaletrain.train import Trainer

    torch.set_num_threads(1)
    work = Path(a.work)
    sets = {
        "raw": "stdlib",
        "cleaned": str(prepared(work, "cleaned")),
        "decontaminated": str(prepared(work, "decontaminated", "prep.decontaminate=true")),
    }
    (full, n_full), (clean, n_clean) = held_out_streams(Path(sets["cleaned"]))
    common = [
        "train.device=cpu", "model.family=gpt", "model.n_layer=2", "model.n_embd=64", "model.n_head=2",
        "model.block_size=64", "train.micro_batch=16", f"train.steps={a.steps}",
        f"train.warmup_steps={min(50, a.steps // 10)}", "train.eval_every=0", "train.eval_iters=8",
        "train.ckpt_every=0", f"run.out_dir={work / 'runs'}", f"data.cache_dir={work / 'cache'}",
    ]  # fmt: skip
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for name, src in sets.items():
            cfg = load_config(overrides=common + [f"data.source={src}", f"run.name={name}{seed}", f"train.seed={seed}"])
            s = Trainer(cfg, default_callbacks=False).fit()
            c = ck.latest_checkpoint(s["run_dir"])
            model = build_model(ck.checkpoint_config(c).model)
            ck.load_model_weights(c, model)
            model.eval()
            row = dict(
                data=name,
                seed=seed,
                train_tokens_seen=a.steps * 16 * 64,
                loss_all_held_out=round(loss(model, full), 4),
                loss_held_out_passing_rules=round(loss(model, clean), 4),
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    held = dict(all_files=n_full, all_tokens=len(full), passing_files=n_clean, passing_tokens=len(clean))
    Path(a.out).write_text(json.dumps(dict(held_out=held, rows=rows), indent=1))


if __name__ == "__main__":
    main()

"Shared fixtures: a tiny corpus, tiny-model overrides, and a CLI runner."

import os
import subprocess
import sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    "A small folder of text files (fast to tokenize, enough for a train/val split by file)."
    d = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (d / f"doc{i}.txt").write_text((f"def f{i}(x):\n    return x * {i} + {i % 3}\n\n" * 40) + "the end\n")
    return d


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny(corpus, cache_dir, out_dir, *extra):
    "Overrides for a 2-layer GPT (GPT-2's layout, biases on) on the tiny corpus."
    return [
        f"data.source={corpus}",
        f"data.cache_dir={cache_dir}",
        f"run.out_dir={out_dir}",
        "train.device=cpu",
        "model.family=gpt",
        "model.bias=true",
        "model.n_layer=2",
        "model.n_embd=32",
        "model.n_head=2",
        "model.block_size=32",
        "train.micro_batch=4",
        "train.steps=6",
        "train.warmup_steps=2",
        "train.eval_every=3",
        "train.eval_iters=2",
        "train.ckpt_every=3",
        *extra,
    ]


def run_cli(*args, cwd=None, timeout=300, env=None):
    "Run `python -m scaletrain.cli ...` in a subprocess; returns CompletedProcess (text)."
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "scaletrain.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
    )


def torchrun_rows(worker: str, nproc: int = 2, timeout: int = 300) -> list:
    "Run tests/<worker> under torchrun (gloo, loopback); assert it succeeded and return the JSON lines it printed."
    import json
    from scaletrain.procs import torchrun_args, child_env

    r = subprocess.run(
        torchrun_args([str(ROOT / "tests" / worker)], nproc=nproc),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]


def notebook_function(src: str, name: str):
    "A function as a notebook cell defines it: its module is __main__, so cloudpickle must ship it by value."
    ns = {"__name__": "__main__"}
    exec(src, ns)
    assert ns[name].__module__ == "__main__"
    return ns[name]

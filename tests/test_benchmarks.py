"""The GPU benchmark scripts that `benchmarks/run_gpu.sh` runs, in their `--tiny` CPU mode: a lent GPU's few minutes
must not go to a script that an API change has broken. Each runs as run_gpu.sh runs it (same flags, smaller model)
and must write a record for every variant it measures; on CPU the fp8 rows are refused with the trainer's message.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script, *args, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=out,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_overhead_benchmark_runs_its_gpu_variants_and_profiles_the_host(tmp_path):
    variants = ["anchor_raw_compiled", "st_raw_compiled", "trainer_compiled", "trainer_compiled_model"]
    run_bench("overhead_gpu.py", "--only", ",".join(variants), "--host-profile", "trainer_compiled", out=tmp_path)
    rows = {r["name"]: r for r in records(tmp_path / "overhead_gpu.jsonl")}
    assert sorted(rows) == sorted(variants)
    assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 for r in rows.values())
    assert "cumulative" in (tmp_path / "host_profile_trainer_compiled.txt").read_text()


def test_the_llama_benchmark_measures_bf16_and_refuses_fp8_on_cpu(tmp_path):
    run_bench("llama_gpu.py", out=tmp_path)
    rows = {r["name"]: r for r in records(tmp_path / "llama_gpu.jsonl")}
    assert {"raw_compiled", "trainer_bf16", "trainer_bf16_model"} <= set(rows)
    assert all(rows[n]["tokens_per_s"] > 0 for n in ("raw_compiled", "trainer_bf16", "trainer_bf16_model"))
    for n in ("trainer_fp8_tensorwise", "trainer_fp8_rowwise"):
        assert rows[n]["refused"].startswith("memory.precision=fp8-mixed: float8 matmuls need an NVIDIA GPU"), rows[n]


def test_the_memory_benchmark_measures_compiled_steps_against_the_estimate(tmp_path):
    run_bench("memory_gpu.py", "--compile", "--precisions", "bf16-mixed", out=tmp_path)
    rows = records(tmp_path / "memory_gpu.jsonl")
    assert [r["ac"] for r in rows] == ["none", "selective", "full", "every_k"]
    # measured compiled (the allocator's events), and within the estimator's 15 % on this tiny model too
    assert all(r["compiled"] and r["peak_bytes"] > 0 and abs(r["error"]) < 0.15 for r in rows), rows

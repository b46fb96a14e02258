"""The timing the benchmark scripts share: the best of some runs of a step, the GPU synchronised around each."""

import time
import torch


def best_seconds(once, device: str, repeats: int, warmup: int = 1) -> float:
    "Best wall seconds of `once()` over `repeats` runs after `warmup` untimed ones (CUDA: synchronised)."
    for _ in range(warmup):
        once()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best

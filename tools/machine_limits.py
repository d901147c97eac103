"""What this machine can do at most, so that a throughput reads as a share of it.

- ``cpu_features``: the CPU model and the instruction-set extensions int8 speed depends on
  (AVX2; AVX-512F; AVX-512 VNNI or AVX-VNNI, the int8 dot products onnxruntime's MLAS uses).
- ``gemm_rate``: a measured fp32 matrix-multiplication rate (GFLOP/s) of onnxruntime's own
  MatMul on the given threads, on transformer-sized operands: the ceiling for a tower whose
  work is almost all GEMMs.
- ``flops``: the FLOPs of one torch call, counted by ``torch.utils.flop_counter`` (matrix
  products and attention; element-wise work is left out, as it is small). ViT-B-32: 8.8
  GFLOP per image; its text tower 5.8 GFLOP per prompt at 77 tokens.

Used by tools/bench_runtime.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_features() -> dict[str, Any]:
    """CPU model, logical CPUs and which of ``FLAGS`` /proc/cpuinfo lists."""
    model, flags = "unknown", set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cpus": os.cpu_count(), "flags": {f: f in flags for f in FLAGS}}


def cpu_line() -> str:
    """``cpu_features`` in one line, for a benchmark's first line: "AMD EPYC (2 CPUs; avx2, fma, ...)"."""
    cpu = cpu_features()
    present = [f for f, there in cpu["flags"].items() if there]
    return f"{cpu['model']} ({cpu['cpus']} CPUs; {', '.join(present) or 'no AVX2'})"


def gemm_rate(threads: int, m: int = 1600, k: int = 768, n: int = 3072, seconds: float = 3.0) -> float:
    """GFLOP/s of ``[m, k] @ [k, n]`` fp32 with onnxruntime on ``threads`` threads (the best of
    short rounds, so a burst of other work on a shared machine counts less)."""
    import onnxruntime as ort

    from forgetpack.format.onnxfile import matmul_graph

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(matmul_graph(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    session.run(None, {"x": x, "w": w})
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(3):
            session.run(None, {"x": x, "w": w})
        best = max(best, 3 * 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def flops(fn: Callable[..., Any], *args: Any) -> float:
    """FLOPs of ``fn(*args)`` under torch's FLOP counter, in inference mode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel hides its projections from the counter
    try:
        with torch.no_grad(), counter:
            fn(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return float(counter.get_total_flops())

"""Timing helpers shared by the benchmark scripts and gpu_check."""

from __future__ import annotations

import time

import jax
import numpy as np


def time_calls(fn, *args, iters: int) -> list[float]:
  """Seconds of each of `iters` calls of `fn(*args)` (results awaited) after one warm-up call
  (which also compiles)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def time_fn(fn, *args, iters: int) -> float:
  """Median seconds per call of `fn(*args)` after one warm-up call (which also compiles)."""
  return float(np.median(time_calls(fn, *args, iters=iters)))

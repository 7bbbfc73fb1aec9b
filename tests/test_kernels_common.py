"""Shared inputs and helpers for tests/test_kernels_*.py (no tests here; tiny shapes: interpret mode is slow)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import reference


def make_inputs(*, rows=37, d=128, n=13, heads=3, branches=2, dim=256, dtype=jnp.float32, seed=0):
  """Random gather_gate inputs; ids include duplicates and both boundary rows.

  Built with NumPy so that tests spend no time compiling input generation.
  """
  rng = np.random.default_rng(seed)
  c = heads * d
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  ids = rng.integers(0, rows, (n, heads), dtype=np.int32)
  ids[0, 0], ids[0, 1] = rows - 1, 0  # boundaries
  ids[1] = ids[0]  # duplicate rows across tokens
  ids[2, :] = 5  # duplicate rows within a token
  arrays = dict(
    table=normal(rows, d),
    w_value=normal(c, dim) / np.sqrt(c),
    b_value=0.1 * normal(dim),
    w_key=normal(branches, c, dim) / np.sqrt(c),
    b_key=0.1 * normal(branches, dim),
    query_normed=normal(n, branches, dim),
    key_norm_scale=1 + 0.1 * normal(branches, dim),
  )
  out = {k: jnp.asarray(v, dtype) for k, v in arrays.items()}
  out["row_ids"] = jnp.asarray(ids)
  return out


ARG_ORDER = ("table", "row_ids", "w_value", "b_value", "w_key", "b_key", "query_normed", "key_norm_scale")
DIFF_ARGS = tuple(a for a in ARG_ORDER if a != "row_ids")


def loss_and_grads(fn, inputs, seed=1):
  """Outputs of fn and the grads (w.r.t. every float input) of a random linear
  functional of them: one forward and one backward call."""

  def float_fn(*float_args):
    full = list(float_args)
    full.insert(1, inputs["row_ids"])
    return fn(*full)

  outs, vjp = jax.vjp(float_fn, *[inputs[a] for a in DIFF_ARGS])
  rng = np.random.default_rng(seed)
  cot = tuple(jnp.asarray(rng.standard_normal(o.shape), o.dtype) for o in outs)
  return outs, dict(zip(DIFF_ARGS, vjp(cot)))


def reference_gather_gate(gate):
  return lambda *a: reference.gather_gate(*a, gate=gate)


def tol(dtype):
  return dict(atol=2e-2, rtol=2e-2) if dtype == jnp.bfloat16 else dict(atol=1e-4, rtol=1e-4)

"""Loading weights from the PyTorch reference implementation of Engram."""

from __future__ import annotations

import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from engram_jax.layers.engram import Engram


def load_reference_engram(module: Engram, state_dict: Mapping[str, np.ndarray]) -> Engram:
  """Copies a reference (PyTorch layout) Engram state dict into `module`, in place.

  Accepts the names of the reference's `Engram` module (an optional prefix ending in '.'
  before `multi_head_embedding.` etc. is stripped). Linear weights are [out, in] there and
  [in, out] here; the depthwise Conv1d weight [G*D, 1, K] becomes [K, G, D].

  Raises:
    ValueError naming missing, unexpected or mis-shaped entries, or head offsets that
    disagree with the module's (different hash constants).
  """
  g, d = module.hc_mult, module.hidden_size
  sd = {}
  for name, value in state_dict.items():
    m = re.search(r"(multi_head_embedding\..*|short_conv\..*|value_proj\..*|key_projs\..*|norm[12]\..*)$", name)
    sd[m.group(1) if m else name] = np.asarray(value)

  expected: dict[str, tuple[int, ...]] = {
    "multi_head_embedding.embedding.weight": module.table.shape,
    "multi_head_embedding.offsets": (module.config.num_heads,),
    "value_proj.weight": (d, module.config.memory_dim),
    "value_proj.bias": (d,),
    "short_conv.conv.weight": (g * d, 1, module.config.kernel_size),
  }
  for i in range(g):
    expected[f"key_projs.{i}.weight"] = (d, module.config.memory_dim)
    expected[f"key_projs.{i}.bias"] = (d,)
    expected[f"norm1.{i}.weight"] = (d,)
    expected[f"norm2.{i}.weight"] = (d,)
    expected[f"short_conv.norms.{i}.weight"] = (d,)
  missing = sorted(set(expected) - set(sd))
  unexpected = sorted(set(sd) - set(expected))
  if missing or unexpected:
    raise ValueError(f"reference state dict mismatch: missing {missing}, unexpected {unexpected}")
  for name, shape in expected.items():
    if tuple(sd[name].shape) != tuple(shape):
      raise ValueError(f"reference parameter {name} has shape {sd[name].shape}, module expects {shape}")
  if not np.array_equal(sd["multi_head_embedding.offsets"], np.asarray(module.offsets)):
    raise ValueError(
      f"reference head offsets {sd['multi_head_embedding.offsets'].tolist()} differ from the "
      f"module's {list(module.offsets)}: the hash constants (table sizes) are not the same"
    )

  def put(var, value):
    var[...] = jnp.asarray(value, var[...].dtype)

  put(module.table, sd["multi_head_embedding.embedding.weight"])
  put(module.value_kernel, sd["value_proj.weight"].T)
  put(module.value_bias, sd["value_proj.bias"])
  put(module.key_kernel, np.stack([sd[f"key_projs.{i}.weight"].T for i in range(g)]))
  put(module.key_bias, np.stack([sd[f"key_projs.{i}.bias"] for i in range(g)]))
  put(module.key_norm.scale, np.stack([sd[f"norm1.{i}.weight"] for i in range(g)]))
  put(module.query_norm.scale, np.stack([sd[f"norm2.{i}.weight"] for i in range(g)]))
  put(module.conv_norm.scale, np.stack([sd[f"short_conv.norms.{i}.weight"] for i in range(g)]))
  conv = sd["short_conv.conv.weight"][:, 0, :].reshape(g, d, -1)  # [G, D, K]
  put(module.conv_kernel, np.transpose(conv, (2, 0, 1)))
  return module

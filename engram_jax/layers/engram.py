"""The Engram layer (Flax NNX): hashed n-gram memory fused into the residual stream.

ENGRAM_SPEC.md §4. Shapes: hidden h [B, T, G, D] (G residual branches), row ids
[B, T, H] with H = (N-1)*K heads, head width d_h = n_embed_per_ngram / K,
memory width d_mem = H * d_h.

  e      = concat_h table[offset_h + row_h]                          [B, T, d_mem]
  v      = e W_V + b_V                                               [B, T, D]
  k_g    = e W_K[g] + b_K[g]                                         [B, T, G, D]
  s_g    = <RMSNorm_q[g](h_g), RMSNorm_k[g](k_g)> / sqrt(D)
  alpha  = sigmoid(sign(s) sqrt(max(|s|, 1e-6)))   ("reference" gate; "paper": sigmoid(s))
  u_g    = alpha_g v
  Y      = u + SiLU(DepthwiseCausalConv(RMSNorm_c[g](u)))   kernel K_c, dilation N, no bias

Ablation / control options (defaults = the module above):
  gate="none"         alpha = 1 (no key projections or gate norms are created).
  short_conv=False    Y = u (no conv norm or conv kernel).
  multi_branch=False  single-branch integration: one key projection and gate computed from
                      the mean of the G branch streams, one value/conv path, and the same Y
                      added to every stream (every per-branch parameter has G = 1).
  fold_rows=r         every head's table holds r rows and the hashed row ids are reduced
                      mod r on device (r = 1: one slot per head, same compute, no memory).

The caller adds Y to its residual stream(s). Logical axis names of the parameters:
  table         ("engram_rows", "engram_dim"), or ("engram_rows_all", ...) with
                table_sharding="all"
  value_kernel  ("engram_mem", "embed")         value_bias ("embed",)
  key_kernel    ("hc", "engram_mem", "embed")   key_bias   ("hc", "embed")
  *_norm.scale  ("hc", "norm")                  conv_kernel ("conv_taps", "hc", "embed")
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import checkify

from engram_jax import sharding
from engram_jax.config import EngramConfig
from engram_jax.distributed import pallas_local_gather, sharded_gather  # lookup level, below layers
from engram_jax.layers.norms import RMSNorm, rms_norm
from engram_jax.layers.params import annotated
from engram_jax.layers.table_init import note_table_init
from engram_jax.offload.indexing import RowIndex  # lookup level, below layers

GateKind = Literal["reference", "paper", "none"]
Impl = Literal["xla", "pallas", "auto"]
ShardedLookup = Literal["all_to_all", "xla"]
#: The `sharded_lookup=` values of `Engram` (see `engram_jax.distributed.METHODS`).
SHARDED_LOOKUPS: tuple[str, ...] = ("all_to_all", "xla")
TableSharding = Literal["tensor", "all"]
#: Logical name of the table's row dimension for each `table_sharding=` layout (the rules
#: that map them to mesh axes are in `engram_jax.sharding`).
TABLE_ROW_AXES: dict[str, str] = {"tensor": "engram_rows", "all": "engram_rows_all"}
MaybeArray = jax.Array | None  # an optional array argument

_GATE_FLOOR = 1e-6


def _debug_check_ids(valid: jax.Array, ids: jax.Array, sizes: jax.Array, where: str) -> None:
  """checkify.debug_check that every per-head id is valid ([..., H] masks and ids).

  A no-op unless the caller runs under `checkify.checkify` (with `checkify.user_checks`);
  then the first invalid id (row-major) is reported with its value, position and head.
  """
  first = jnp.argmin(valid.reshape(-1))
  pos = jnp.unravel_index(first, valid.shape)
  position = ", ".join(["{}"] * len(pos))
  checkify.debug_check(
    jnp.all(valid),
    f"row id {{}} at position ({position}) is outside head {{}}'s table [0, {{}}) of {where}",
    ids.reshape(-1)[first],
    *pos,
    pos[-1],
    sizes[pos[-1]],
  )


class Engram(nnx.Module):
  """Engram memory layer for one transformer block.

  Args:
    config: the model's `EngramConfig`.
    layer_id: the block index this layer sits in (selects its hash constants).
    hidden_size: D, the residual width.
    hc_mult: G, residual branches (1 without hyper-connections).
    table_sizes: the prime size of every head of this layer
      (`NgramHasher.table_sizes[layer_id]`), H entries.
    gate: "reference" (the demo's signed square root, default, for parity), "paper" or
      "none" (alpha = 1: the no-gate ablation).
    impl: row gather implementation: "xla" (reference), "pallas" or "auto" (Pallas on
      GPU/TPU, XLA on CPU); see `pallas_kernels`.
    table_init_std: std of the normal init of the table (the reference: 1.0).
    gate_norm_eps: eps of the gate's RMSNorms; None = machine epsilon of the compute
      dtype (PyTorch's default, which the reference uses).
    conv_norm_eps: eps of the conv input RMSNorm (1e-5).
    short_conv: False drops the short conv (Y = u), the short-conv ablation.
    multi_branch: False is the single-branch ablation (see the module docstring).
    row_multiple: the table's row count is rounded up to a multiple of this (padding rows
      are never addressed) so that a row-sharded table divides evenly over the devices.
    fold_rows: None, or the rows every head's table holds; row ids (still hashed with
      `table_sizes`) are folded mod fold_rows on device. 1 = the one-slot-per-head control.
    sharded_lookup: how the rows are fetched when the table is split by rows over devices
      (inside `jax.set_mesh` with a mesh whose `engram_jax.sharding` rules split
      "engram_rows", i.e. a "tensor" axis > 1 that divides the rows; see `row_multiple`):
      "all_to_all" (default) routes each id to the shard owning its row and the row back
      (`engram_jax.distributed.sharded_gather`, one shard_map, custom VJP); "xla" leaves a
      plain gather to XLA's partitioner (MaxText's approach: masked local gathers plus an
      all-reduce of the rows). Without such a mesh both are the local gather.
    table_sharding: "tensor" (default): the table's rows are split over the model-parallel
      axis (logical name "engram_rows"); "all": over every device of the mesh, data axes
      included, as in the paper ("engram_rows_all"; each device then brings its own tokens
      to the all_to_all). Make `row_multiple` a multiple of the devices it spreads over.
  """

  def __init__(
    self,
    config: EngramConfig,
    layer_id: int,
    hidden_size: int,
    hc_mult: int = 1,
    *,
    table_sizes: Sequence[int],
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    gate: GateKind = "reference",
    impl: Impl = "xla",
    table_init_std: float = 1.0,
    gate_norm_eps: float | None = None,
    conv_norm_eps: float = 1e-5,
    short_conv: bool = True,
    multi_branch: bool = True,
    fold_rows: int | None = None,
    row_multiple: int = 1,
    sharded_lookup: ShardedLookup = "all_to_all",
    table_sharding: TableSharding = "tensor",
    rngs: nnx.Rngs,
  ):
    if layer_id not in config.layer_ids:
      raise ValueError(f"layer_id {layer_id} is not in EngramConfig.layer_ids {config.layer_ids}")
    if gate not in ("reference", "paper", "none"):
      raise ValueError(f"gate must be 'reference', 'paper' or 'none', got {gate!r}")
    if impl not in ("xla", "pallas", "auto"):
      raise ValueError(f"impl must be 'xla', 'pallas' or 'auto', got {impl!r}")
    if sharded_lookup not in SHARDED_LOOKUPS:
      raise ValueError(f"sharded_lookup must be one of {SHARDED_LOOKUPS}, got {sharded_lookup!r}")
    if table_sharding not in TABLE_ROW_AXES:
      raise ValueError(f"table_sharding must be one of {tuple(TABLE_ROW_AXES)}, got {table_sharding!r}")
    if hidden_size < 1 or hc_mult < 1:
      raise ValueError(f"hidden_size and hc_mult must be positive, got {hidden_size}, {hc_mult}")
    sizes = np.asarray([int(s) for s in table_sizes], dtype=np.int64)
    if sizes.shape != (config.num_heads,) or (sizes < 1).any():
      raise ValueError(f"table_sizes must hold {config.num_heads} positive head sizes ((N-1)*K), got {sizes.tolist()}")
    self.config = config
    self.layer_id = int(layer_id)
    self.hidden_size = hidden_size
    self.hc_mult = hc_mult
    self.gate = gate
    self.impl = impl
    self.sharded_lookup = sharded_lookup
    self.table_row_axis = TABLE_ROW_AXES[table_sharding]
    self.dtype = dtype
    self.gate_norm_eps = gate_norm_eps
    self.short_conv_enabled = bool(short_conv)
    self.multi_branch = bool(multi_branch)
    self.fold_rows = fold_rows
    # The one mapping of hashed ids to flat table rows (fold, offsets, padding rows, which
    # make the row count divisible by the model-parallel axis so the table really is split
    # by rows). table_sizes: the hashed range of each head's ids (the input contract);
    # stored_sizes: the rows each head really holds (equal unless fold_rows is set).
    self.row_index = RowIndex(tuple(int(s) for s in sizes), fold_rows, row_multiple)
    self.table_sizes = self.row_index.table_sizes
    self.stored_sizes = self.row_index.stored_sizes
    self.offsets = tuple(int(o) for o in self.row_index.offsets)
    self.num_rows = self.row_index.num_rows

    # g: branches with their own gate / conv parameters (1 in the single-branch ablation)
    d_h, d_mem, d = config.head_dim, config.memory_dim, hidden_size
    g = self.num_branches
    k_table, k_v, k_k = jax.random.split(rngs.params(), 3)
    lecun = nnx.initializers.lecun_normal()
    note_table_init(self.layer_id, k_table, (self.num_rows, d_h), table_init_std, param_dtype)
    self.table = annotated(
      table_init_std * jax.random.normal(k_table, (self.num_rows, d_h), param_dtype),
      (self.table_row_axis, "engram_dim"),
    )
    self.value_kernel = annotated(lecun(k_v, (d_mem, d), param_dtype), ("engram_mem", "embed"))
    self.value_bias = annotated(jnp.zeros((d,), param_dtype), ("embed",))
    norm_kw = dict(leading=(g,), axis_names=("hc", "norm"), dtype=dtype, param_dtype=param_dtype)
    if gate != "none":
      self.key_kernel = annotated(
        jax.vmap(lambda k: lecun(k, (d_mem, d), param_dtype))(jax.random.split(k_k, g)), ("hc", "engram_mem", "embed")
      )
      self.key_bias = annotated(jnp.zeros((g, d), param_dtype), ("hc", "embed"))
      self.key_norm = RMSNorm(d, eps=0.0, **norm_kw)  # eps resolved at call time
      self.query_norm = RMSNorm(d, eps=0.0, **norm_kw)
    if self.short_conv_enabled:
      self.conv_norm = RMSNorm(d, eps=conv_norm_eps, **norm_kw)
      # Zero init (the paper): Y = u at the start of training.
      self.conv_kernel = annotated(jnp.zeros((config.kernel_size, g, d), param_dtype), ("conv_taps", "hc", "embed"))

  # -- shapes ----------------------------------------------------------------------------------
  @property
  def num_branches(self) -> int:
    """Branches with their own gate and conv (G, or 1 in the single-branch ablation)."""
    return self.hc_mult if self.multi_branch else 1

  @property
  def conv_state_len(self) -> int:
    """Past conv inputs a decoder must keep: (kernel - 1) * dilation."""
    return (self.config.kernel_size - 1) * self.config.conv_dilation

  def init_conv_state(self, batch: int, dtype=None) -> jax.Array:
    """Zeros for the decoder's conv history: [batch, conv_state_len, G, D] (dtype: the layer's)."""
    return jnp.zeros((batch, self.conv_state_len, self.num_branches, self.hidden_size), dtype or self.dtype)

  # -- lookup ------------------------------------------------------------------------------------
  def check_row_ids(self, engram_ids: jax.Array) -> None:
    """Shape check always; range check when the ids are concrete (not traced)."""
    h = self.config.num_heads
    if engram_ids.ndim < 1 or engram_ids.shape[-1] != h:
      raise ValueError(f"engram_ids must end in the {h} heads of layer {self.layer_id}, got shape {engram_ids.shape}")
    if not jnp.issubdtype(engram_ids.dtype, jnp.integer):
      raise ValueError(f"engram_ids must be integers, got dtype {engram_ids.dtype}")
    if isinstance(engram_ids, jax.core.Tracer):
      return
    self.row_index.flat_np(engram_ids, f"Engram layer {self.layer_id}")

  def row_sharding(self, ids_shape: Sequence[int]) -> dict | None:
    """Where the all_to_all lookup runs: None for a local gather (no active mesh, the
    table not split by rows, or sharded_lookup="xla"), else the `sharded_gather` layout
    (mesh, table axes, batch axes) for row ids of shape `ids_shape` [B, ..., H].

    The layout comes from `engram_jax.sharding.LOGICAL_AXIS_RULES` (the table's row axis
    name, "batch" for the ids), the rules that placed the parameters.
    """
    if self.sharded_lookup == "xla":
      return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not set(sharding.MESH_AXES) <= set(mesh.axis_names):
      return None
    table_spec = sharding.logical_to_spec(
      (self.table_row_axis, "engram_dim"), mesh, (self.num_rows, self.config.head_dim)
    )
    table_axes = sharding.axis_tuple(table_spec[0])
    if not table_axes:
      return None
    batch_spec = sharding.logical_to_spec(("batch",), mesh, (ids_shape[0],))
    return dict(mesh=mesh, axis=table_axes, batch_axes=sharding.axis_tuple(batch_spec[0]))

  def head_bounds(self, engram_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-head bounds of hashed ids [..., H] -> (safe flat rows int32 [..., H], valid bool [..., H]).

    Head h's id must lie in [0, table_sizes[h]); it is checked BEFORE the head offset is
    added, so an id past its head's table can never read the next head's rows. Invalid ids
    are replaced by the head's row 0 (always in range, so no kernel reads out of bounds) and
    the caller turns their rows into NaN. Under `jax.experimental.checkify` (errors including
    `checkify.user_checks`) an invalid id raises with its value and position; without
    checkify the check is free (a `checkify.debug_check`).
    """
    flat, valid = self.row_index.flat_jnp(engram_ids)
    if isinstance(engram_ids, jax.core.Tracer):  # concrete ids were checked by check_row_ids
      _debug_check_ids(valid, engram_ids, jnp.asarray(self.table_sizes, jnp.int32), f"Engram layer {self.layer_id}")
    return flat, valid

  def flat_row_ids(self, engram_ids: jax.Array) -> jax.Array:
    """Per-head row ids [..., H] -> int32 rows of the flat table [..., H] (per-head bounds,
    fold, offsets: `head_bounds`; an invalid id maps to its head's row 0); checked eagerly
    outside jit (`check_row_ids`)."""
    engram_ids = jnp.asarray(engram_ids)
    self.check_row_ids(engram_ids)
    return self.head_bounds(engram_ids)[0]

  def lookup(self, engram_ids: jax.Array) -> jax.Array:
    """Gathers the rows of every head: [..., H] per-head ids -> [..., H * d_h].

    Concrete ids out of a head's range raise a ValueError (`check_row_ids`). Under jit an
    id outside [0, table_sizes[h]) cannot raise: its head's d_h values are NaN (every impl:
    xla, pallas, the sharded lookups), so it surfaces in the loss and never reads another
    head's rows. Wrap the caller in `checkify.checkify(..., errors=checkify.user_checks)`
    to raise with the position instead (`head_bounds`).
    """
    engram_ids = jnp.asarray(engram_ids)
    self.check_row_ids(engram_ids)
    flat, valid = self.head_bounds(engram_ids)
    table = self.table[...]
    layout = self.row_sharding(flat.shape) if flat.ndim > 1 else None
    if layout is not None:
      local = None if self.impl == "xla" else pallas_local_gather(self.impl)
      rows = sharded_gather(table, flat, local_gather=local, **layout)
    elif self.impl == "xla":
      rows = jnp.take(table, flat, axis=0, mode="fill", fill_value=jnp.nan)
    else:
      from pallas_kernels import gather_rows  # kernels sit below layers

      lead = flat.shape[:-1]
      rows = gather_rows(table, flat.reshape(-1, flat.shape[-1]), impl=self.impl)
      rows = rows.reshape(lead + (flat.shape[-1], table.shape[-1]))
    rows = jnp.where(valid[..., None], rows, jnp.asarray(jnp.nan, rows.dtype))
    return rows.reshape(engram_ids.shape[:-1] + (-1,)).astype(self.dtype)

  # -- fusion ----------------------------------------------------------------------------------
  def gates(self, hidden: jax.Array, engram_rows: jax.Array) -> jax.Array:
    """alpha [B, T, G] from hidden [B, T, G, D] and gathered engram_rows [B, T, d_mem]
    (G = `num_branches`; all ones with gate="none")."""
    if self.gate == "none":
      return jnp.ones(hidden.shape[:3], self.dtype)
    eps = self.gate_norm_eps if self.gate_norm_eps is not None else float(jnp.finfo(hidden.dtype).eps)
    key = jnp.einsum("btm,gmd->btgd", engram_rows, self.key_kernel[...].astype(self.dtype))
    key = key + self.key_bias[...].astype(self.dtype)
    key = rms_norm(key, self.key_norm.scale[...], eps)
    query = rms_norm(hidden.astype(self.dtype), self.query_norm.scale[...], eps)
    score = jnp.sum(key.astype(jnp.float32) * query.astype(jnp.float32), -1) / math.sqrt(self.hidden_size)
    if self.gate == "reference":
      score = jnp.sign(score) * jnp.sqrt(jnp.maximum(jnp.abs(score), _GATE_FLOOR))
    return jax.nn.sigmoid(score).astype(self.dtype)

  def short_conv(
    self, x: jax.Array, *, segment_ids: MaybeArray = None, conv_state: MaybeArray = None, lengths: MaybeArray = None
  ) -> tuple[jax.Array, jax.Array]:
    """SiLU(depthwise causal conv) of the normed input x [B, T, G, D].

    `conv_state` [B, S, G, D] holds the previous S = (kernel-1)*N normed inputs (zeros
    at a sequence start). With `segment_ids`, taps never reach into another document of
    a packed row. Returns (y, new_state): the state after the first `lengths[b]` new
    tokens of each sequence (all T when `lengths` is None).
    """
    b, t = x.shape[:2]
    s_len, dil = self.conv_state_len, self.config.conv_dilation
    if conv_state is None:
      conv_state = jnp.zeros((b, s_len) + x.shape[2:], x.dtype)
    full = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)  # [B, S+T, G, D]
    w = self.conv_kernel[...].astype(jnp.float32)
    kernel = self.config.kernel_size
    y = jnp.zeros(x.shape, jnp.float32)
    for k in range(kernel):
      lag = (kernel - 1 - k) * dil  # tap k reads x[t - lag]
      tap = jax.lax.dynamic_slice_in_dim(full, s_len - lag, t, axis=1).astype(jnp.float32)
      if segment_ids is not None and lag > 0:
        prev = jnp.pad(segment_ids, ((0, 0), (lag, 0)), constant_values=-1)[:, :t]
        tap = tap * (prev == segment_ids)[..., None, None]
      y = y + tap * w[k]
    if lengths is None:
      new_state = full[:, t:]
    else:
      new_state = jax.vmap(lambda f, n: jax.lax.dynamic_slice_in_dim(f, n, s_len, 0))(full, lengths)
    return jax.nn.silu(y).astype(x.dtype), new_state

  def fuse(
    self,
    hidden: jax.Array,
    engram_rows: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    conv_state: jax.Array | None = None,
    lengths: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gate, value and short conv from pre-gathered rows.

    Args:
      hidden: [B, T, G, D].  engram_rows: [B, T, d_mem] (from `lookup`, or gathered from host).
    Returns:
      (Y [B, T, G, D], gates [B, T, G], new conv state [B, S, G', D]); G' = 1 in the
      single-branch ablation (whose gate is then repeated over the G streams), and the
      conv state is returned as given (or zeros) without the short conv.
    """
    rows = engram_rows.astype(self.dtype)
    if rows.shape[-1] != self.config.memory_dim:
      raise ValueError(f"engram_rows must have width d_mem={self.config.memory_dim}, got shape {rows.shape}")
    streams = hidden.shape[2]
    if not self.multi_branch:  # one gate from the mean stream; Y shared by every stream
      hidden = jnp.mean(hidden.astype(jnp.float32), axis=2, keepdims=True).astype(hidden.dtype)
    alpha = self.gates(hidden, rows)
    value = rows @ self.value_kernel[...].astype(self.dtype) + self.value_bias[...].astype(self.dtype)
    u = alpha[..., None] * value[:, :, None, :]
    return self._finish(u, alpha, streams, segment_ids=segment_ids, conv_state=conv_state, lengths=lengths)

  def _finish(
    self, u: jax.Array, alpha: jax.Array, streams: int, *, segment_ids, conv_state, lengths
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Short conv on the gated value u [B, T, G', D]; Y and gates broadcast to `streams`."""
    if self.short_conv_enabled:
      conv_in = rms_norm(u, self.conv_norm.scale[...], self.conv_norm.eps)
      conv_out, new_state = self.short_conv(conv_in, segment_ids=segment_ids, conv_state=conv_state, lengths=lengths)
      y = u + conv_out
    else:
      y = u
      new_state = conv_state if conv_state is not None else self.init_conv_state(u.shape[0], u.dtype)
    if not self.multi_branch:
      y = jnp.broadcast_to(y, y.shape[:2] + (streams,) + y.shape[3:])
      alpha = jnp.broadcast_to(alpha, alpha.shape[:2] + (streams,))
    return y, alpha, new_state

  def _fused_gather_gate(self, hidden: jax.Array, engram_ids: jax.Array, *, segment_ids) -> tuple[jax.Array, jax.Array]:
    """impl="pallas"/"auto": rows go from the table straight into the fused gather-gate op
    (`pallas_kernels.gather_gate`), never written out as a [B, T, d_mem] array."""
    from pallas_kernels import gather_gate  # kernels sit below layers

    b, t, streams, d = hidden.shape
    self.check_row_ids(engram_ids)
    flat, valid = self.head_bounds(engram_ids)
    flat = flat.reshape(b * t, -1)
    if not self.multi_branch:
      hidden = jnp.mean(hidden.astype(jnp.float32), axis=2, keepdims=True).astype(hidden.dtype)
    g = hidden.shape[2]
    eps = self.gate_norm_eps if self.gate_norm_eps is not None else float(jnp.finfo(hidden.dtype).eps)
    query = rms_norm(hidden.astype(self.dtype), self.query_norm.scale[...], eps)
    u, alpha = gather_gate(
      self.table[...],
      flat,
      self.value_kernel[...],
      self.value_bias[...],
      self.key_kernel[...],
      self.key_bias[...],
      query.reshape(b * t, g, d),
      self.key_norm.scale[...],
      gate=self.gate,
      norm_eps=eps,
      impl=self.impl,
      out_dtype=self.dtype,
    )
    # The rows never leave the kernel: a token with an invalid id gets NaN u and gates.
    ok = jnp.all(valid, axis=-1).reshape(b * t, 1)
    u = jnp.where(ok[..., None], u, jnp.asarray(jnp.nan, u.dtype))
    alpha = jnp.where(ok, alpha, jnp.asarray(jnp.nan, alpha.dtype))
    y, alpha, _ = self._finish(
      u.reshape(b, t, g, d),
      alpha.reshape(b, t, g).astype(self.dtype),
      streams,
      segment_ids=segment_ids,
      conv_state=None,
      lengths=None,
    )
    return y, alpha

  def __call__(
    self,
    hidden: jax.Array,
    engram_ids: jax.Array | None = None,
    *,
    engram_rows: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    return_gates: bool = False,
  ):
    """Y for hidden [B, T, G, D] (or [B, T, D] when G = 1) and hashed row ids engram_ids [B, T, H].

    Pass `engram_rows` [B, T, d_mem] instead of `engram_ids` to use rows gathered elsewhere
    (host offload). Returns Y with hidden's shape (and the gates [B, T, G] if asked).
    """
    rows = engram_rows
    squeeze = hidden.ndim == 3
    if squeeze:
      if self.hc_mult != 1:
        raise ValueError(f"hidden [B, T, D] is only accepted when hc_mult == 1 (got {self.hc_mult})")
      hidden = hidden[:, :, None, :]
    if hidden.ndim != 4 or hidden.shape[2:] != (self.hc_mult, self.hidden_size):
      raise ValueError(f"hidden must be [B, T, {self.hc_mult}, {self.hidden_size}], got shape {hidden.shape}")
    if (engram_ids is None) == (rows is None):
      raise ValueError("pass exactly one of engram_ids (to gather) or engram_rows (pre-gathered)")
    if rows is None:
      engram_ids = jnp.asarray(engram_ids)
      if engram_ids.shape[:2] != hidden.shape[:2]:
        raise ValueError(f"engram_ids shape {engram_ids.shape} does not match hidden [B, T] = {hidden.shape[:2]}")
    fused = self.impl != "xla" and self.gate != "none"
    if rows is None and fused and self.row_sharding(engram_ids.shape) is None:
      y, alpha = self._fused_gather_gate(hidden, engram_ids, segment_ids=segment_ids)
    else:
      if rows is None:
        rows = self.lookup(engram_ids)
      y, alpha, _ = self.fuse(hidden, rows, segment_ids=segment_ids)
    if squeeze:
      y = y[:, :, 0, :]
    return (y, alpha) if return_gates else y


class NgramInputAverage(nnx.Module):
  """OverEncoding-style baseline: the same hashed n-gram rows as an Engram layer, averaged
  over heads, projected to D and added to the input embedding (no gate, no conv).

    e_t = mean_h table[offset_h + row_h(t)]     [B, T, d_h]
    x_0 <- x_0 + e_t W + b                      W [d_h, D]

  The table has the same rows (one block per head, `table_sizes`) and logical axes as
  Engram's, so it joins the same optimizer group and holds the same memory parameters.
  """

  def __init__(
    self,
    config: EngramConfig,
    layer_id: int,
    hidden_size: int,
    *,
    table_sizes: Sequence[int],
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    table_init_std: float = 1.0,
    rngs: nnx.Rngs,
  ):
    sizes = np.asarray([int(s) for s in table_sizes], dtype=np.int64)
    if sizes.shape != (config.num_heads,) or (sizes < 1).any():
      raise ValueError(f"table_sizes must hold {config.num_heads} positive head sizes ((N-1)*K), got {sizes.tolist()}")
    if layer_id not in config.layer_ids:
      raise ValueError(f"layer_id {layer_id} is not in EngramConfig.layer_ids {config.layer_ids}")
    self.config, self.layer_id, self.dtype = config, int(layer_id), dtype
    self.row_index = RowIndex(tuple(int(s) for s in sizes))
    self.table_sizes = self.row_index.table_sizes
    self.offsets = tuple(int(o) for o in self.row_index.offsets)
    d_h = config.head_dim
    k_table, k_proj = jax.random.split(rngs.params())
    self.table = annotated(
      table_init_std * jax.random.normal(k_table, (int(sizes.sum()), d_h), param_dtype), ("engram_rows", "engram_dim")
    )
    self.proj_kernel = annotated(
      nnx.initializers.lecun_normal()(k_proj, (d_h, hidden_size), param_dtype), ("engram_dim", "embed")
    )
    self.proj_bias = annotated(jnp.zeros((hidden_size,), param_dtype), ("embed",))

  def __call__(self, engram_ids: jax.Array) -> jax.Array:
    """engram_ids [B, T, H] (per-head rows, offsets added inside) -> [B, T, D]."""
    engram_ids = jnp.asarray(engram_ids)
    if engram_ids.ndim != 3 or engram_ids.shape[-1] != self.config.num_heads:
      raise ValueError(f"engram_ids must be [B, T, {self.config.num_heads}], got shape {engram_ids.shape}")
    where = f"the n-gram input average of layer {self.layer_id}"
    flat, valid = self.row_index.flat_jnp(engram_ids)  # per head, before the offset
    if isinstance(engram_ids, jax.core.Tracer):
      _debug_check_ids(valid, engram_ids, jnp.asarray(self.table_sizes, jnp.int32), where)
    else:
      self.row_index.flat_np(engram_ids, where)
    rows = jnp.where(valid[..., None], jnp.take(self.table[...], flat, axis=0), jnp.nan)
    mean = jnp.mean(rows.astype(jnp.float32), axis=-2).astype(self.dtype)  # [B, T, d_h]
    return mean @ self.proj_kernel[...].astype(self.dtype) + self.proj_bias[...].astype(self.dtype)

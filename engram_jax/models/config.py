"""`ModelConfig`: the decoder's hyper-parameters, for all three families from one code path.

Families (see `ModelConfig.family`):
  "dense"       every block: attention + dense SwiGLU FFN            (moe=None, engram=None)
  "moe"         first `num_dense_layers` blocks dense, the rest MoE  (moe set, engram=None)
  "engram_moe"  as "moe", plus Engram at `engram.layer_ids`          (moe and engram set)
("engram_dense", Engram on an all-dense backbone, is allowed too.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from engram_jax.config import EngramConfig, check_bool, check_float, check_int, check_known_fields
from engram_jax.layers.moe import MoEConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ENGRAM_GATES = ("reference", "paper", "none")
ENGRAM_MODES = ("engram", "input_average")
ENGRAM_IMPLS = ("xla", "pallas", "auto")
ENGRAM_SHARDED_LOOKUPS = ("all_to_all", "xla")
ENGRAM_TABLE_SHARDINGS = ("tensor", "all")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only Transformer with optional MoE, mHC and Engram.

  Attributes:
    vocab_size: token vocabulary (rows of the input embedding / columns of the head).
    hidden_size: D, width of each residual stream.
    num_layers: number of blocks.
    num_heads, num_kv_heads, head_dim: grouped-query attention shape.
    ffn_hidden: width of the dense SwiGLU FFN (dense blocks).
    num_dense_layers: with `moe`, the first k blocks use the dense FFN, the rest MoE.
    moe: MoEConfig, or None for an all-dense model.
    hc_mult: G, number of hyper-connection residual streams (1 = plain residual).
    sinkhorn_iters: Sinkhorn-Knopp rounds projecting H_res onto doubly stochastic matrices.
    rope_theta: RoPE base.
    engram: EngramConfig, or None for no Engram layers.
    engram_compressed_vocab: size of the compressed vocabulary the `NgramHasher` uses
      (None: `vocab_size`). Table sizes (primes) depend only on `engram`.
    engram_gate: "reference" (signed square root, the demo's), "paper", or "none"
      (alpha = 1; the no-gate ablation).
    engram_impl: Engram lookup implementation passed to the layer.
    engram_short_conv: False drops the Engram short conv (Y = u; ablation).
    engram_multi_branch: False is the single-branch ablation: one gate from the mean of
      the hc_mult streams and one Y added to every stream (`Engram(multi_branch=False)`).
    engram_fold_rows: None, or the rows every Engram head's table holds; hashed row ids
      are folded mod this on device. 1 = the "one slot per head" control (same data,
      hashing and compute, no memory).
    engram_row_multiple: Engram table rows are padded up to a multiple of this so the
      table divides evenly over the model-parallel (`tensor`) axis; set it to a multiple
      of the tensor-parallel size when sharding (a non-dividing table is replicated).
    engram_sharded_lookup: how a row-sharded Engram table is read under a mesh:
      "all_to_all" (default: ids routed to the shard owning their row,
      `engram_jax.distributed.sharded_gather`) or "xla" (XLA partitions a plain gather;
      MaxText's approach). See `Engram(sharded_lookup=...)` and docs/DISTRIBUTED.md.
    engram_table_sharding: "tensor" (Engram table rows split over the `tensor` axis) or
      "all" (over every device of the mesh, the paper's layout; pair it with the all_to_all
      lookup, and an `engram_row_multiple` divisible by the device count).
    engram_mode: "engram" (Engram layers at engram.layer_ids), or "input_average": the
      OverEncoding-style baseline, no Engram blocks; for each layer id the same hashed
      rows are averaged over heads, projected to D and added to the input embedding
      (`NgramInputAverage`). Ignored when engram is None.
    engram_table_init_std: std of the normal init of the Engram (and input-average) tables;
      1.0 is the reference's. Small models learn faster from a smaller one (docs/RESULTS.md).
    tie_embeddings: the output head reuses the input embedding.
    norm_eps: RMSNorm epsilon.
    dtype, param_dtype: names in DTYPES, for activations and parameters.
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffn_hidden: int
  num_dense_layers: int = 1
  moe: MoEConfig | None = None
  hc_mult: int = 1
  sinkhorn_iters: int = 20
  rope_theta: float = 10000.0
  engram: EngramConfig | None = None
  engram_compressed_vocab: int | None = None
  engram_gate: str = "reference"
  engram_impl: str = "xla"
  engram_short_conv: bool = True
  engram_multi_branch: bool = True
  engram_fold_rows: int | None = None
  engram_row_multiple: int = 1
  engram_sharded_lookup: str = "all_to_all"
  engram_table_sharding: str = "tensor"
  engram_mode: str = "engram"
  engram_table_init_std: float = 1.0
  tie_embeddings: bool = False
  norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first inconsistent field."""
    for name in (
      "vocab_size",
      "hidden_size",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "ffn_hidden",
      "hc_mult",
      "sinkhorn_iters",
    ):
      check_int("ModelConfig", name, getattr(self, name), low=1)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"ModelConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
      )
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if not isinstance(self.num_dense_layers, int) or not (0 <= self.num_dense_layers <= self.num_layers):
      raise ValueError(
        f"ModelConfig.num_dense_layers must be in [0, num_layers={self.num_layers}], got {self.num_dense_layers!r}"
      )
    if self.moe is not None and not isinstance(self.moe, MoEConfig):
      raise ValueError(f"ModelConfig.moe must be a MoEConfig or None, got {self.moe!r}")
    if self.engram is not None:
      if not isinstance(self.engram, EngramConfig):
        raise ValueError(f"ModelConfig.engram must be an EngramConfig or None, got {self.engram!r}")
      bad = [i for i in self.engram.layer_ids if i >= self.num_layers]
      if bad:
        raise ValueError(
          f"ModelConfig.engram.layer_ids {self.engram.layer_ids} has ids {bad} >= num_layers={self.num_layers}"
        )
    if self.engram_gate not in ENGRAM_GATES:
      raise ValueError(f"ModelConfig.engram_gate must be one of {ENGRAM_GATES}, got {self.engram_gate!r}")
    if self.engram_impl not in ENGRAM_IMPLS:
      raise ValueError(f"ModelConfig.engram_impl must be one of {ENGRAM_IMPLS}, got {self.engram_impl!r}")
    if self.engram_sharded_lookup not in ENGRAM_SHARDED_LOOKUPS:
      raise ValueError(
        f"ModelConfig.engram_sharded_lookup must be one of {ENGRAM_SHARDED_LOOKUPS}, got {self.engram_sharded_lookup!r}"
      )
    if self.engram_table_sharding not in ENGRAM_TABLE_SHARDINGS:
      raise ValueError(
        f"ModelConfig.engram_table_sharding must be one of {ENGRAM_TABLE_SHARDINGS}, got {self.engram_table_sharding!r}"
      )
    if self.engram_mode not in ENGRAM_MODES:
      raise ValueError(f"ModelConfig.engram_mode must be one of {ENGRAM_MODES}, got {self.engram_mode!r}")
    for name in ("engram_short_conv", "engram_multi_branch"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
    if (
      isinstance(self.engram_row_multiple, bool)
      or not isinstance(self.engram_row_multiple, int)
      or self.engram_row_multiple < 1
    ):
      raise ValueError(f"ModelConfig.engram_row_multiple must be a positive int, got {self.engram_row_multiple!r}")
    std = self.engram_table_init_std
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < float("inf"):
      raise ValueError(f"ModelConfig.engram_table_init_std must be a positive finite number, got {std!r}")
    fold = self.engram_fold_rows
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int) or fold < 1):
      raise ValueError(f"ModelConfig.engram_fold_rows must be None or a positive int, got {fold!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
    check_float("ModelConfig", "norm_eps", self.norm_eps, low=0.0, low_open=True)
    check_float("ModelConfig", "rope_theta", self.rope_theta, low=0.0, low_open=True)
    check_bool("ModelConfig", "tie_embeddings", self.tie_embeddings)
    check_int("ModelConfig", "engram_compressed_vocab", self.engram_compressed_vocab, low=1, optional=True)
    check_int("ModelConfig", "num_dense_layers", self.num_dense_layers, low=0, high=self.num_layers)

  # ----------------------------------------------------------------------------- structure
  @property
  def family(self) -> str:
    """ "dense", "moe", "engram_moe" or "engram_dense"."""
    if self.engram is None:
      return "dense" if self.moe is None else "moe"
    return "engram_dense" if self.moe is None else "engram_moe"

  def is_moe_layer(self, layer: int) -> bool:
    """Whether layer `layer` (0-based) has an MoE FFN (every layer from `num_dense_layers` on, in an MoE model)."""
    return self.moe is not None and layer >= self.num_dense_layers

  @property
  def moe_layer_ids(self) -> tuple[int, ...]:
    """The 0-based ids of the MoE layers, ascending."""
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  @property
  def engram_layer_ids(self) -> tuple[int, ...]:
    """The 0-based ids of the layers with an Engram module (empty without Engram)."""
    return () if self.engram is None else tuple(self.engram.layer_ids)

  @property
  def jnp_dtype(self):
    """The compute dtype (`dtype`) as a jnp dtype."""
    return DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    """The parameter dtype (`param_dtype`) as a jnp dtype."""
    return DTYPES[self.param_dtype]

  # ------------------------------------------------------------------------- constructors
  def replace(self, **changes: Any) -> ModelConfig:
    """A copy with the given fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def make(
    cls,
    family: str,
    *,
    moe: MoEConfig | None = None,
    engram: EngramConfig | None = None,
    **backbone: Any,
  ) -> ModelConfig:
    """One code path for every family: checks that `moe` / `engram` match `family`."""
    needs = {
      "dense": (False, False),
      "moe": (True, False),
      "engram_moe": (True, True),
      "engram_dense": (False, True),
    }
    if family not in needs:
      raise ValueError(f"unknown model family {family!r}; expected one of {sorted(needs)}")
    want_moe, want_engram = needs[family]
    if want_moe != (moe is not None):
      raise ValueError(f"family {family!r} {'needs' if want_moe else 'takes no'} moe config")
    if want_engram != (engram is not None):
      raise ValueError(f"family {family!r} {'needs' if want_engram else 'takes no'} engram config")
    return cls(moe=moe, engram=engram, **backbone)

  @classmethod
  def dense(cls, **backbone: Any) -> ModelConfig:
    """A dense backbone (no MoE, no Engram) with the given backbone fields."""
    return cls.make("dense", **backbone)

  @classmethod
  def moe_model(cls, moe: MoEConfig, **backbone: Any) -> ModelConfig:
    """An MoE backbone without Engram."""
    return cls.make("moe", moe=moe, **backbone)

  @classmethod
  def engram_moe(cls, moe: MoEConfig, engram: EngramConfig, **backbone: Any) -> ModelConfig:
    """An MoE backbone with Engram modules (the paper's Engram model)."""
    return cls.make("engram_moe", moe=moe, engram=engram, **backbone)

  @classmethod
  def tiny(cls, family: str = "dense", **overrides: Any) -> ModelConfig:
    """A few-thousand-parameter model for tests and examples (hidden 32, 3 blocks,
    vocab 128; MoE 8 experts top-2 + 1 shared; Engram at block 1, orders 2-3)."""
    backbone = {
      "vocab_size": 128,
      "hidden_size": 32,
      "num_layers": 3,
      "num_heads": 4,
      "num_kv_heads": 2,
      "head_dim": 8,
      "ffn_hidden": 64,
      "num_dense_layers": 1,
    }
    moe = MoEConfig(num_experts=8, num_shared_experts=1, top_k=2, expert_hidden=16)
    engram = EngramConfig(
      vocab_sizes=(61, 53),
      max_ngram_size=3,
      n_embed_per_ngram=16,
      n_head_per_ngram=2,
      layer_ids=(1,),
      pad_id=0,
      seed=0,
    )
    parts = {
      "moe": moe if family in ("moe", "engram_moe") else None,
      "engram": engram if family.startswith("engram") else None,
    }
    for key in ("moe", "engram"):
      if key in overrides:
        parts[key] = overrides.pop(key)
    backbone.update(overrides)
    return cls.make(family, **parts, **backbone)

  # ---------------------------------------------------------------------------- serialise
  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict (nested MoE and Engram configs as dicts); inverse of `from_dict`."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["moe"] = None if self.moe is None else dataclasses.asdict(self.moe)
    d["engram"] = None if self.engram is None else self.engram.to_dict()
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    """The config `to_dict` wrote; unknown fields are refused by name."""
    check_known_fields(cls, d)
    d = dict(d)
    if d.get("moe") is not None:
      d["moe"] = MoEConfig(**d["moe"])
    if d.get("engram") is not None:
      d["engram"] = EngramConfig.from_dict(d["engram"])
    return cls(**d)

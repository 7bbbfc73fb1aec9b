"""`EngramConfig`: the hyper-parameters that define an Engram memory (ENGRAM_SPEC.md §3-4)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class EngramConfig:
  """Configuration of the hashed n-gram memory shared by every Engram layer of a model.

  Attributes:
    vocab_sizes: nominal rows per head, one entry per n-gram order 2..N. The real
      table size of each head is a distinct prime just above it (see `NgramHasher`).
    max_ngram_size: N, the largest n-gram order (orders 2..N; there is no 1-gram branch).
    n_embed_per_ngram: width of one order's embedding; split evenly over its heads.
    n_head_per_ngram: K, hash heads per order (each with its own prime modulus).
    layer_ids: 0-based indices of the transformer blocks that hold an Engram layer.
    pad_id: the token id used to fill positions before the start of a sequence or
      document. `NgramHasher` treats it as a COMPRESSED id unless told otherwise
      (`NgramHasher.from_compressor` maps a raw pad id through the compressor).
    seed: seed of the per-layer multiplier generator.
    kernel_size: taps of the short depthwise causal convolution (dilation = N).
    allow_layer_zero: layer 0 leaves no lead time for prefetching rows, so it is
      refused unless explicitly allowed (the reference test data uses it).
  """

  vocab_sizes: tuple[int, ...] = (646_400, 646_400)
  max_ngram_size: int = 3
  n_embed_per_ngram: int = 512
  n_head_per_ngram: int = 8
  layer_ids: tuple[int, ...] = (1, 15)
  pad_id: int = 2
  seed: int = 0
  kernel_size: int = 4
  allow_layer_zero: bool = False

  def __post_init__(self):
    # Accept lists from JSON / ml_collections, store tuples so the config stays hashable.
    object.__setattr__(self, "vocab_sizes", int_tuple("EngramConfig", "vocab_sizes", self.vocab_sizes))
    object.__setattr__(self, "layer_ids", int_tuple("EngramConfig", "layer_ids", self.layer_ids))
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first inconsistent field, its value and the allowed range."""
    for name, low in (
      ("max_ngram_size", 2),
      ("n_embed_per_ngram", 1),
      ("n_head_per_ngram", 1),
      ("pad_id", 0),
      ("seed", 0),
      ("kernel_size", 1),
    ):
      check_int("EngramConfig", name, getattr(self, name), low=low)
    check_bool("EngramConfig", "allow_layer_zero", self.allow_layer_zero)
    n = self.max_ngram_size
    if len(self.vocab_sizes) != n - 1:
      raise ValueError(
        f"EngramConfig.vocab_sizes has {len(self.vocab_sizes)} entries but max_ngram_size={n} "
        f"needs one per order 2..{n}, i.e. {n - 1}"
      )
    for order, size in enumerate(self.vocab_sizes, start=2):
      if size < 2:
        raise ValueError(f"EngramConfig.vocab_sizes[{order - 2}] (order {order}) must be >= 2, got {size}")
    if self.n_head_per_ngram < 1:
      raise ValueError(f"EngramConfig.n_head_per_ngram must be >= 1, got {self.n_head_per_ngram}")
    if self.n_embed_per_ngram < 1 or self.n_embed_per_ngram % self.n_head_per_ngram:
      raise ValueError(
        f"EngramConfig.n_embed_per_ngram={self.n_embed_per_ngram} must be a positive multiple of "
        f"n_head_per_ngram={self.n_head_per_ngram}"
      )
    if not self.layer_ids:
      raise ValueError("EngramConfig.layer_ids is empty: name at least one block for Engram")
    if len(set(self.layer_ids)) != len(self.layer_ids):
      raise ValueError(f"EngramConfig.layer_ids must be unique, got {self.layer_ids}")
    for lid in self.layer_ids:
      if lid < 0:
        raise ValueError(f"EngramConfig.layer_ids must be >= 0, got {lid}")
      if lid == 0 and not self.allow_layer_zero:
        raise ValueError(
          "EngramConfig.layer_ids contains 0: Engram at the first block leaves no lead time to "
          "prefetch rows (ENGRAM_SPEC.md §4.6); pass allow_layer_zero=True to use it anyway"
        )
    if self.kernel_size < 1:
      raise ValueError(f"EngramConfig.kernel_size must be >= 1, got {self.kernel_size}")
    if self.pad_id < 0:
      raise ValueError(f"EngramConfig.pad_id must be a non-negative token id, got {self.pad_id}")

  @property
  def num_orders(self) -> int:
    """N-gram orders per layer: 2..N, so N - 1."""
    return self.max_ngram_size - 1

  @property
  def num_heads(self) -> int:
    """Hash heads per layer: (N - 1) * K."""
    return self.num_orders * self.n_head_per_ngram

  @property
  def head_dim(self) -> int:
    """Width of one table row: n_embed_per_ngram / K."""
    return self.n_embed_per_ngram // self.n_head_per_ngram

  @property
  def memory_dim(self) -> int:
    """d_mem: width of the concatenated rows of one token, (N - 1) * n_embed_per_ngram."""
    return self.num_orders * self.n_embed_per_ngram

  @property
  def conv_dilation(self) -> int:
    """Dilation of the short causal conv: N (`max_ngram_size`), as in the reference."""
    return self.max_ngram_size

  def replace(self, **changes: Any) -> "EngramConfig":
    """A copy with `changes` applied, checked like a new config."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """The fields as JSON-able data (tuples as lists); `from_dict` inverts it."""
    d = dataclasses.asdict(self)
    d["vocab_sizes"] = list(self.vocab_sizes)
    d["layer_ids"] = list(self.layer_ids)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "EngramConfig":
    """A config from `to_dict` output; ValueError naming any unknown field."""
    check_known_fields(cls, d)
    return cls(**d)


def _range_text(low, high, low_open: bool = False, high_open: bool = False) -> str:
  if low is not None and high is not None:
    return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  if low is not None:
    return f" {'>' if low_open else '>='} {low}"
  if high is not None:
    return f" {'<' if high_open else '<='} {high}"
  return ""


def check_int(
  owner: str, name: str, value: Any, *, low: int | None = None, high: int | None = None, optional: bool = False
) -> None:
  """ValueError "<owner>.<name> must be [None or ]an int in [low, high], got <value>" unless it is."""
  if value is None and optional:
    return
  ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if not ok or (low is not None and value < low) or (high is not None and value > high):
    raise ValueError(
      f"{owner}.{name} must be {'None or ' if optional else ''}an int{_range_text(low, high)}, got {value!r}"
    )


def check_float(
  owner: str,
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  optional: bool = False,
) -> None:
  """ValueError naming the field, the value and the range unless `value` is a finite number in it."""
  if value is None and optional:
    return
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
  if ok:
    ok = (low is None or (value > low if low_open else value >= low)) and (
      high is None or (value < high if high_open else value <= high)
    )
  if not ok:
    raise ValueError(
      f"{owner}.{name} must be {'None or ' if optional else ''}a finite number"
      f"{_range_text(low, high, low_open, high_open)}, got {value!r}"
    )


def check_bool(owner: str, name: str, value: Any) -> None:
  """ValueError naming `owner.name` unless `value` is a bool (1 and "yes" are refused)."""
  if not isinstance(value, bool):
    raise ValueError(f"{owner}.{name} must be True or False, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
  """ValueError naming `owner.name`, the value and the allowed `choices` unless it is one of them."""
  if value not in tuple(choices):
    raise ValueError(f"{owner}.{name} must be one of {tuple(choices)}, got {value!r}")


def int_tuple(owner: str, name: str, values: Any) -> tuple[int, ...]:
  """A list / tuple of ints as a tuple; ValueError naming the field for anything else (a
  float such as 2.7 is refused, not truncated)."""
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
    raise ValueError(f"{owner}.{name} must be a sequence of ints, got {values!r}")
  for i, v in enumerate(values):
    if not isinstance(v, numbers.Integral) or isinstance(v, bool):
      raise ValueError(f"{owner}.{name}[{i}] must be an int, got {v!r} (in {name}={values!r})")
  return tuple(int(v) for v in values)


def check_known_fields(cls: type, d: dict[str, Any]) -> None:
  """`from_dict` of the config dataclasses: refuses keys that are not fields of `cls`."""
  unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"{cls.__name__}.from_dict: unknown fields {sorted(unknown)}")

"""Shared config skeleton and the ConfigDict -> library dataclass conversion.

A run config (ml_collections.ConfigDict) has these blocks, each overridable from the
command line as ``--config.<block>.<field>=<value>``:
  variant     "dense" | "moe" | "engram"
  model       backbone fields of `ModelConfig`
  moe         `MoEConfig` fields (MoE and Engram variants)
  engram      `EngramConfig` fields (vocab_sizes are set by the allocation)
  allocation  rho: the routed-expert share of the sparse budget of the Engram variant;
              active_rtol: tolerated active-parameter mismatch with the MoE twin
  data        `DataConfig` fields;   train  `TrainConfig` fields
  mesh        data / fsdp / tensor / expert axis sizes (-1 on data = all devices left)
  seed

Every field can be set from the command line, None- and tuple-valued ones included:
  scalars  --config.train.learning_rate=1e-3   --config.data.tokenizer_path=/tok/tokenizer.json
           (fields whose default is None are typed placeholders: the value is parsed as the
           dataclass field's type; `None` (or `none`) sets an optional field back to None)
  tuples   comma-separated, no brackets or quotes needed:
             --config.data.sources=text:/data/*.txt,jsonl:/x/*.jsonl:body
             --config.engram.layer_ids=1,3   --config.engram.vocab_sizes=1000,2000
           or a Python literal (for an item holding a comma): --config.data.sources="('text:/a,b.txt',)";
           repeating the flag appends: --config.data.sources=stdlib --config.data.sources=text:/d/*.txt
"""

from __future__ import annotations

import ast
import dataclasses
import re
import types
import typing

import ml_collections
from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags, tuple_parser

from engram_jax import EngramConfig
from engram_jax.config import check_bool, check_choice, check_float, check_int
from engram_jax.data import DataConfig
from engram_jax.layers.moe import MoEConfig
from engram_jax.models.accounting import allocate, count_params
from engram_jax.models.config import ModelConfig
from engram_jax.train import TrainConfig

VARIANTS = ("dense", "moe", "engram")
# ModelConfig fields the variant decides (the moe / engram blocks), not set in `model`.
_MODEL_BLOCK_FIELDS = ("moe", "engram")
_NONE = ("None", "none")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# -- command-line parsers --------------------------------------------------------------------
def _scalar(text: str):
  """An unquoted tuple item: an int or float when it reads as a number, else the string."""
  text = text.strip()
  if _NUMBER.fullmatch(text):
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)
  return text


class SequenceParser(tuple_parser.TupleParser):
  """Tuple fields: "a,b,c" (items are numbers when they read as numbers, else strings),
  a Python literal "(1, 2)" / "['x']", "" or "()" for the empty tuple; repeated flags append."""

  def parse(self, argument):
    if isinstance(argument, (list, tuple)) and not isinstance(argument, str):
      if all(isinstance(a, str) for a in argument):  # repeated flags: every one parsed, joined
        return tuple(item for a in argument for item in self.parse(a))
      return tuple(argument)
    if argument is None:
      return ()
    if not isinstance(argument, str):
      return (argument,)
    text = argument.strip()
    if text[:1] in "([":
      try:
        value = ast.literal_eval(text)
      except (SyntaxError, ValueError) as e:
        raise ValueError(f"cannot parse {argument!r} as a tuple literal: {e}") from None
      if not isinstance(value, (list, tuple)):
        raise ValueError(f"{argument!r} is not a tuple or list literal")
      return tuple(value)
    if not text:
      return ()
    return tuple(_scalar(item) for item in text.split(","))


class _OptionalParser(flags.ArgumentParser):
  """A scalar parser that also takes `None` / `none` (the dataclass then validates the value)."""

  def __init__(self, base: flags.ArgumentParser):
    self.base = base

  def parse(self, argument):
    if isinstance(argument, str) and argument.strip() in _NONE:
      return None
    return self.base.parse(argument)

  def flag_type(self):
    return self.base.flag_type()


config_flags.register_flag_parser_for_type(tuple, SequenceParser())
for _type, _parser in ((int, flags.IntegerParser()), (float, flags.FloatParser()), (str, flags.ArgumentParser())):
  config_flags.register_flag_parser_for_type(_type, _OptionalParser(_parser))


def _field_type(hint) -> type:
  """The parser type of a dataclass field's annotation: X | None -> X; tuple[...] -> tuple."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
    hint = args[0]
  origin = typing.get_origin(hint)
  if origin in (tuple, list):
    return tuple
  if origin is typing.Literal:
    return type(typing.get_args(hint)[0])
  if isinstance(hint, type) and hint in (int, float, str, bool):
    return hint
  return object  # ml_collections' literal parser (Python literals, else the string)


def _defaults(cls, *, skip: tuple[str, ...] = (), **overrides) -> dict:
  """A config block with every field of dataclass `cls` that has a default (plus `overrides`):
  lists become tuples and None-valued fields typed placeholders, so that every field can be
  overridden from the command line."""
  hints = typing.get_type_hints(cls)
  fields = {
    f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING and f.name not in skip
  }
  fields.update(overrides)
  out = {}
  for name, value in fields.items():
    if isinstance(value, list):
      value = tuple(value)
    if value is None:
      value = config_dict.placeholder(_field_type(hints[name]))
    out[name] = value
  return out


def base_config(variant: str) -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  backbone = dict(vocab_size=2048, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)
  c.model = _defaults(ModelConfig, skip=_MODEL_BLOCK_FIELDS, **backbone, ffn_hidden=256)
  c.moe = _defaults(MoEConfig, num_experts=16, num_shared_experts=1, top_k=2, expert_hidden=64)
  c.engram = _defaults(
    EngramConfig, vocab_sizes=(1000, 1000), layer_ids=(1,), pad_id=0, n_embed_per_ngram=32, n_head_per_ngram=2
  )
  c.engram.compress_tokens = True
  c.allocation = dict(rho=0.8, active_rtol=0.05)
  c.data = _defaults(DataConfig)
  c.train = _defaults(TrainConfig)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1)
  return c


#: Engram table init std 0.1 (reference 1.0) and Adam at 20x the lr (library default 5x): the
#: micro pilot in docs/RESULTS.md (paired, -0.064 +/- 0.003 nats against the reference values).
PILOTED_TABLE = {"model": {"engram_table_init_std": 0.1}, "train": {"engram_lr_multiplier": 20.0}}


def update(c: ml_collections.ConfigDict, block: str, **fields) -> ml_collections.ConfigDict:
  """Sets `fields` of the block `c.<block>` ("model", "data", ...) and returns `c`; a block
  or a field the config lacks is a ValueError naming it (nothing is added)."""
  blocks = sorted(k for k, v in c.items() if isinstance(v, ml_collections.ConfigDict))
  if block not in blocks:
    raise ValueError(f"unknown config block {block!r}; blocks are {blocks}")
  unknown = sorted(set(fields) - set(c[block]))
  if unknown:
    raise ValueError(f"config.{block} has no fields {unknown}")
  c[block].update(fields)
  return c


def derive(variant: str, *presets: dict) -> ml_collections.ConfigDict:
  """`base_config(variant)` with each preset ({block: {field: value}}, like `PILOTED_TABLE`)
  applied in order through `update`."""
  c = base_config(variant)
  for preset in presets:
    for block, fields in preset.items():
      update(c, block, **fields)
  return c


def _plain(d) -> dict:
  d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


def moe_config(c) -> MoEConfig:
  return MoEConfig(**_plain(c.moe))


def engram_config(c) -> EngramConfig:
  d = _plain(c.engram)
  d.pop("compress_tokens", None)
  return EngramConfig(**d)


MESH_AXES = ("data", "fsdp", "tensor", "expert")


def validate(c) -> None:
  """The run config's own fields (variant, seed, allocation, mesh, engram.compress_tokens):
  ValueError naming the field, the value and the allowed range. The dataclass blocks are
  validated by their dataclasses."""
  check_choice("config", "variant", c.variant, VARIANTS)
  check_int("config", "seed", c.seed, low=0)
  check_float("config.allocation", "rho", c.allocation.rho, low=0.0, high=1.0)
  check_float("config.allocation", "active_rtol", c.allocation.active_rtol, low=0.0)
  check_bool("config.engram", "compress_tokens", c.engram.get("compress_tokens", True))
  mesh = dict(c.mesh)
  if set(mesh) != set(MESH_AXES):
    raise ValueError(f"config.mesh must have exactly the axes {MESH_AXES}, got {sorted(mesh)}")
  for axis in MESH_AXES[1:]:
    check_int("config.mesh", axis, mesh[axis], low=1)
  data = mesh["data"]
  if data != -1 and (isinstance(data, bool) or not isinstance(data, int) or data < 1):
    raise ValueError(f"config.mesh.data must be -1 (every device the other axes leave) or an int >= 1, got {data!r}")


def model_config(c) -> ModelConfig:
  """The `ModelConfig` of a run config; the Engram variant is allocated against its MoE twin."""
  validate(c)
  backbone = _plain(c.model)
  moe_twin = ModelConfig.moe_model(moe_config(c), **backbone)
  if c.variant == "moe":
    return moe_twin
  if c.variant == "dense":
    # iso-active: every block dense, FFN as wide as the MoE's active experts
    m = c.moe
    width = (m.top_k + m.num_shared_experts) * m.expert_hidden
    return ModelConfig.dense(**{**backbone, "ffn_hidden": width, "num_dense_layers": backbone["num_layers"]})
  counts = count_params(moe_twin)
  base = ModelConfig.engram_moe(moe_config(c), engram_config(c), **backbone)
  return allocate(
    base, counts.total, counts.active, float(c.allocation.rho), active_rtol=float(c.allocation.active_rtol)
  ).config


def data_config(c) -> DataConfig:
  return DataConfig(**_plain(c.data))


def train_config(c) -> TrainConfig:
  return TrainConfig(**_plain(c.train))


def compress_tokens(c) -> bool:
  return bool(c.engram.get("compress_tokens", True))


def mesh_axes(c, device_count: int) -> dict[str, int]:
  validate(c)
  axes = dict(c.mesh)
  fixed = axes["fsdp"] * axes["tensor"] * axes["expert"]
  if axes["data"] == -1:  # -1: every device the other axes leave
    if device_count % fixed:
      raise ValueError(f"mesh fsdp*tensor*expert={fixed} does not divide {device_count} devices")
    axes["data"] = device_count // fixed
  if axes["data"] * fixed != device_count:
    raise ValueError(f"mesh {axes} needs {axes['data'] * fixed} devices, have {device_count}")
  return axes

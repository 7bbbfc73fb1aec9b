r"""Fact-recall probe of a saved run: does the model recall planted key -> value facts?

  python -m experiments.fact_probe --checkpoint=runs/experiments/runs/<key> \
      [--num_facts=256 --held_out_facts=256 --fact_seed=0]

The facts are regenerated from the run's data config and tokenizer
(`engram_jax.data.facts`): `trained` ones were mixed into its training documents
(`DataConfig.num_facts`), `held_out` ones never were. Each fact is scored as its own
sequence, as it was trained (key tokens, then the value): cross-entropy and accuracy of
the value token given the key. Reported per set as mean ± SE over facts, and the
difference trained - held-out (independent sets; its SE from both). A run trained
without facts can be probed with --num_facts: then both sets are unseen.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from engram_jax.data import special_ids
from engram_jax.data.facts import KEY_TOKENS, Fact, make_facts
from engram_jax.data.packing import row_to_example
from engram_jax.data.tokenizer import token_byte_lengths
from engram_jax.train import stats


def _score(model, tokenizer, row_hasher, facts: tuple[Fact, ...]) -> dict[str, np.ndarray]:
  """Per fact: cross-entropy (nats) and correctness of the value token."""
  if not facts:
    return {"ce": np.zeros(0), "correct": np.zeros(0)}
  eos = special_ids(tokenizer).eos
  pad = special_ids(tokenizer).pad
  ids = np.asarray([list(f.ids) + [eos] for f in facts], np.int32)
  seg = np.ones_like(ids)
  pos = np.ascontiguousarray(np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape))
  batch = row_hasher(row_to_example(ids, seg, pos, pad, token_byte_lengths(tokenizer)))
  graphdef, state = nnx.split(model)

  @jax.jit
  def value_logp(state, tokens, rows, positions, segment_ids):
    logits, _ = nnx.merge(graphdef, state)(tokens, rows or None, positions=positions, segment_ids=segment_ids)
    return jax.nn.log_softmax(logits[:, KEY_TOKENS - 1].astype(jax.numpy.float32), axis=-1)

  logp = np.asarray(value_logp(state, batch["tokens"], batch["engram_ids"], batch["positions"], batch["segment_ids"]))
  values = ids[:, KEY_TOKENS]
  ce = -logp[np.arange(len(facts)), values]
  correct = (np.argmax(logp, axis=-1) == values).astype(np.float64)
  return {"ce": ce.astype(np.float64), "correct": correct}


def probe(
  run, *, num_facts: int | None = None, held_out_facts: int | None = None, fact_seed: int | None = None
) -> dict[str, Any]:
  """The probe's metrics for a `LoadedRun` (defaults: the facts its data config planted)."""
  return probe_model(
    run.model,
    run.tokenizer,
    run.row_hasher,
    run.data_config,
    num_facts=num_facts,
    held_out_facts=held_out_facts,
    fact_seed=fact_seed,
  )


def probe_model(
  model,
  tokenizer,
  row_hasher,
  data,
  *,
  num_facts: int | None = None,
  held_out_facts: int | None = None,
  fact_seed: int | None = None,
) -> dict[str, Any]:
  """As `probe`, for a model in memory with its tokenizer, `EngramRowHasher` and DataConfig."""
  n_train = data.num_facts if num_facts is None else num_facts
  n_held = (data.num_held_out_facts if num_facts is None else n_train) if held_out_facts is None else held_out_facts
  seed = data.fact_seed if fact_seed is None else fact_seed
  if n_train + n_held == 0:
    raise ValueError("the run planted no facts (DataConfig.num_facts=0); pass num_facts to probe unseen facts")
  facts = make_facts(tokenizer, n_train, n_held, seed)
  trained_in_run = data.num_facts > 0 and (n_train, seed) == (data.num_facts, data.fact_seed)
  out: dict[str, Any] = {
    "facts_trained_in_run": bool(trained_in_run),
    "num_seen": len(facts.trained),
    "num_unseen": len(facts.held_out),
  }
  scores = {
    "seen": _score(model, tokenizer, row_hasher, facts.trained),
    "unseen": _score(model, tokenizer, row_hasher, facts.held_out),
  }
  for name, s in scores.items():
    if len(s["ce"]):
      out[f"{name}_ce"], out[f"{name}_ce_se"] = stats.mean_se(s["ce"])
      out[f"{name}_acc"], out[f"{name}_acc_se"] = stats.mean_se(s["correct"])
  if len(scores["seen"]["ce"]) and len(scores["unseen"]["ce"]):
    out["seen_minus_unseen_ce"] = out["seen_ce"] - out["unseen_ce"]
    out["seen_minus_unseen_ce_se"] = math.sqrt(out["seen_ce_se"] ** 2 + out["unseen_ce_se"] ** 2)
  out["per_fact_seen_ce"] = scores["seen"]["ce"].tolist()
  out["per_fact_unseen_ce"] = scores["unseen"]["ce"].tolist()
  return out


def probe_checkpoint(path: str, **kwargs) -> dict[str, Any]:
  from engram_jax.train.restore import load_run

  return probe(load_run(path), **kwargs)


def format_probe(p: dict[str, Any]) -> str:
  lines = []
  for name in ("seen", "unseen"):
    if f"{name}_ce" in p:
      lines.append(
        f"{name:>6} facts ({p[f'num_{name}']}): value CE {p[f'{name}_ce']:.3f} ± "
        f"{p[f'{name}_ce_se']:.3f} nats, accuracy {p[f'{name}_acc']:.3f} ± {p[f'{name}_acc_se']:.3f}"
      )
  if "seen_minus_unseen_ce" in p:
    lines.append(f"seen - unseen CE: {stats.format_pm(p['seen_minus_unseen_ce'], p['seen_minus_unseen_ce_se'], 3)}")
  return "\n".join(lines)


def define_flags() -> dict:
  """The command-line flags (defined only when run as a script: sweep_lib imports this)."""
  return {
    "checkpoint": flags.DEFINE_string("checkpoint", None, "Run directory.", required=True),
    "num_facts": flags.DEFINE_integer("num_facts", None, "Facts scored as 'seen' (default: the run's)."),
    "held_out_facts": flags.DEFINE_integer("held_out_facts", None, "Held-out facts (default: the run's)."),
    "fact_seed": flags.DEFINE_integer("fact_seed", None, "Fact generator seed (default: the run's)."),
  }


def main(argv):
  del argv
  p = probe_checkpoint(
    _F["checkpoint"].value,
    num_facts=_F["num_facts"].value,
    held_out_facts=_F["held_out_facts"].value,
    fact_seed=_F["fact_seed"].value,
  )
  print(format_probe(p))
  print(json.dumps({k: v for k, v in p.items() if not k.startswith("per_fact")}, indent=1))


_F: dict = {}

if __name__ == "__main__":
  _F.update(define_flags())
  app.run(main)

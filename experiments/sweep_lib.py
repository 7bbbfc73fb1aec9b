"""Shared helpers of the paper-reproduction experiments: build variants, run-or-resume them,
collect results as JSON and plot them.

Layout under an experiment workdir (the scripts share it, so identical runs are trained once):
  runs/<key>/            one training run (checkpoints, metrics.jsonl, meta.json) and its
                         result.json; <key> hashes everything that defines the run (model,
                         train, data configs, seed, compression), so a finished run is reused
                         (also by another experiment) and a changed config never reads a
                         stale result.
  <experiment>/results.json, <experiment>/*.png, <experiment>/table.md
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from engram_jax.train import evaluation, stats
from experiments.configs import common

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
# Config fields added after runs were keyed: at these defaults they leave a run's key (and so
# the finished runs) unchanged; add a new field here when it is added to a config.
# table_optimizer: runs recorded before the field existed trained with dense table Adam
KEY_NEUTRAL_DEFAULTS = {
  "train": {"table_placement": "device", "table_optimizer": "dense_adam"},
  "data": {"decode_errors": "error"},
  "model": {"engram_row_multiple": 1, "engram_sharded_lookup": "all_to_all", "engram_table_sharding": "tensor"},
}
LOCK_FILE = "running.lock"


# ------------------------------------------------------------------------------- configs
def with_overrides(config: ml_collections.ConfigDict, *, steps: int | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` with the experiment-wide overrides applied (--steps: total steps,
  warmup 10% of them, one evaluation at the end)."""
  c = config.copy_and_resolve_references()
  if steps is not None:
    if steps < 1:
      raise ValueError(f"--steps must be positive, got {steps}")
    c.train.total_steps = steps
    c.train.warmup_steps = max(1, steps // 10)
    c.train.eval_every = steps
    c.train.log_every = min(c.train.log_every, steps)
  c.train.progress_bar = False
  return c


def with_seed(config: ml_collections.ConfigDict, seed: int, data_seed: int | None = None) -> ml_collections.ConfigDict:
  """Replicate `seed`: the model init seed (`config.seed`) and the data-order seed
  (`config.data.seed`, default the same number). Variants of one replicate share both, so
  their comparison is paired on init and data; the validation tokens never change."""
  c = config.copy_and_resolve_references()
  c.seed = int(seed)
  c.data.seed = int(seed if data_seed is None else data_seed)
  return c


def scale_backbone(config: ml_collections.ConfigDict, factor: float) -> ml_collections.ConfigDict:
  """The same architecture at another compute budget: hidden size times `factor` (rounded
  to a multiple of 2 * num_heads), with head_dim, dense FFN and expert widths scaled along
  (so total, active parameters and FLOPs per token all grow)."""
  if factor <= 0:
    raise ValueError(f"budget scale must be positive, got {factor}")
  c = config.copy_and_resolve_references()
  if factor == 1.0:
    return c
  m = c.model
  unit = 2 * m.num_heads
  hidden = max(unit, round(m.hidden_size * factor / unit) * unit)
  ratio = hidden / m.hidden_size
  m.head_dim = max(2, round(m.head_dim * ratio / 2) * 2)
  m.ffn_hidden = max(1, round(m.ffn_hidden * ratio))
  c.moe.expert_hidden = max(1, round(c.moe.expert_hidden * ratio))
  m.hidden_size = hidden
  return c


def engram_at_slots(config: ml_collections.ConfigDict, slots_per_head: int, **model_overrides) -> ModelConfig:  # noqa: F821
  """The MoE backbone of `config` unchanged (its own expert count) plus Engram with
  `slots_per_head` nominal rows per head (no allocation: the backbone is fixed)."""
  from engram_jax.models.config import ModelConfig

  if slots_per_head < 2:
    raise ValueError(f"slots_per_head must be >= 2, got {slots_per_head}")
  engram = common.engram_config(config)
  engram = engram.replace(vocab_sizes=(int(slots_per_head),) * engram.num_orders)
  backbone = {**common._plain(config.model), **model_overrides}
  return ModelConfig.engram_moe(common.moe_config(config), engram, **backbone)


# ------------------------------------------------------------------------------- variants
@dataclasses.dataclass
class Variant:
  """One training run of an experiment: a name, its run config (data / train / seed) and
  the exact `ModelConfig` (which may carry options the ConfigDict does not express)."""

  name: str
  config: ml_collections.ConfigDict
  model: Any  # ModelConfig
  info: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"rho": 0.8}

  def key(self) -> str:
    spec = {
      "model": self.model.to_dict(),
      "train": common.train_config(self.config).to_dict(),
      "data": common.data_config(self.config).to_dict(),
      "seed": int(self.config.seed),
      "compress": common.compress_tokens(self.config),
    }
    for block, fields in KEY_NEUTRAL_DEFAULTS.items():
      for name, default in fields.items():
        if spec[block].get(name, default) == default:
          spec[block].pop(name, None)
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]

  def run_dir(self, workdir: Path) -> Path:
    # keyed by content only, so experiments that need the same run share it
    return Path(workdir) / "runs" / self.key()


def actual_param_counts(model_config) -> dict[str, int]:
  """Parameters of the built model (shapes only, nothing allocated): total and Engram tables
  (the analytic accounting does not model the ablation / control options)."""
  from flax import nnx

  from engram_jax.train.optimizer import ENGRAM_TABLE, parameter_label
  from engram_jax.train.state import build_model

  model = nnx.eval_shape(lambda: build_model(model_config, 0))
  params = nnx.state(model, nnx.Param)
  total = table = 0
  for path, var in nnx.to_flat_state(params):
    size = int(var.get_value().size)
    total += size
    if parameter_label(path, var) == ENGRAM_TABLE:
      table += size
  return {"total": total, "engram_table": table}


def hardware() -> str:
  """The devices, the host's CPU count and the jax version, for the results' records."""
  d = jax.devices()[0]
  cpus = os.cpu_count()
  return (
    f"{d.platform} x{jax.device_count()} ({d.device_kind}); host {platform.machine()} "
    f"with {cpus} CPU cores; jax {jax.__version__}"
  )


def run_variant(variant: Variant, workdir: str | Path) -> dict[str, Any]:
  """Trains `variant` under workdir/runs (or reuses its finished result) and returns its row:
  validation metrics, final train loss, parameter counts, FLOPs per token, wall time."""
  from engram_jax import sharding as sharding_lib
  from engram_jax.models.accounting import count_params, flops_per_token
  from engram_jax.train.metrics import read_metrics
  from engram_jax.train.trainer import Trainer

  run_dir = variant.run_dir(Path(workdir))
  result_path = run_dir / RESULT_FILE
  if result_path.is_file():
    row = json.loads(result_path.read_text())
    log.info("reusing %s", run_dir)
    return {**row, **variant.info, "name": variant.name, "reused": True}

  c = variant.config
  axes = common.mesh_axes(c, jax.device_count())
  trainer = Trainer(
    variant.model,
    common.train_config(c),
    common.data_config(c),
    run_dir,
    seed=int(c.seed),
    mesh=sharding_lib.make_mesh(**axes),
    compress_tokens=common.compress_tokens(c),
  )
  t0 = time.perf_counter()
  result = trainer.run()
  wall = time.perf_counter() - t0
  if result.status != "completed":
    raise RuntimeError(f"run {run_dir} stopped early ({result.status}); rerun to resume it")
  evaluation = result.eval
  if evaluation is None:  # finished before (checkpoint at the last step), result.json lost
    vals = read_metrics(run_dir, "val")
    if not vals:
      raise RuntimeError(f"run {run_dir} is complete but has no validation metrics")
    evaluation = {k: v for k, v in vals[-1].items() if k.startswith("val_")}
  train = read_metrics(run_dir, "train")
  tail = [r["loss"] for r in train[-4:]]
  counts = count_params(trainer.model_config)
  actual = actual_param_counts(trainer.model_config)
  dc = trainer.data_config
  row = {
    "name": variant.name,
    "run_dir": str(run_dir),
    "seed": int(c.seed),
    "steps": result.step,
    "tokens": result.step * dc.batch_size * dc.seq_len,
    "train_loss_tail": sum(tail) / len(tail) if tail else float("nan"),
    **evaluation,
    "params_total": actual["total"],
    "params_engram_table": actual["engram_table"],
    "analytic_total": counts.total,
    "analytic_active": counts.active,
    "num_experts": None if trainer.model_config.moe is None else trainer.model_config.moe.num_experts,
    "flops_per_token": flops_per_token(trainer.model_config, dc.seq_len),
    "tokens_per_second": result.tokens_per_second,
    "wall_seconds": wall,
    "hardware": hardware(),
  }
  row["data_seed"] = int(dc.seed)
  if trainer.model_config.engram is not None:
    row["slots_per_head"] = list(trainer.model_config.engram.vocab_sizes)
  if dc.num_facts:
    row["fact_probe"] = fact_probe_of(run_dir, trainer)
  result_path.write_text(json.dumps(row, indent=1))
  return {**row, **variant.info, "reused": False}


def fact_probe_of(run_dir: str | Path, trainer=None) -> dict[str, Any]:
  """The fact-recall probe of a finished run (per-fact values in run_dir/fact_probe.json):
  of the trainer's final state in memory when given (device-placed tables), else loaded."""
  from flax import nnx

  from engram_jax.train.state import build_model
  from experiments import fact_probe

  if trainer is not None and getattr(trainer, "host_trainer", None) is None:
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(trainer.model_config, 0)))
    model = nnx.merge(graphdef, trainer.state.params, trainer.state.rest)
    p = fact_probe.probe_model(model, trainer.tokenizer, trainer.row_hasher, trainer.data_config)
  else:
    p = fact_probe.probe_checkpoint(str(run_dir))
  (Path(run_dir) / "fact_probe.json").write_text(json.dumps(p))
  return {k: v for k, v in p.items() if not k.startswith("per_fact")}


# ------------------------------------------------------------------------------- statistics
def pair_key(row: dict) -> tuple[int, int]:
  """What two runs must share to be paired: (init seed, data seed)."""
  return int(row["seed"]), int(row.get("data_seed", row["seed"]))


def paired_vs(row: dict, ref: dict) -> tuple[float, float]:
  """(loss(row) - loss(ref), SE clustered by sequence) on their shared validation tokens."""
  a, info_a = evaluation.load_rows(row["run_dir"])
  b, info_b = evaluation.load_rows(ref["run_dir"])
  return evaluation.paired(a, info_a, b, info_b)


def ok(row: dict) -> bool:
  return "failed" not in row and "run_dir" in row


def paired_summary(
  rows: Sequence[dict],
  group: Callable[[dict], Any],
  is_ref: Callable[[dict], bool],
  ref_group: Callable[[dict], Any] = lambda r: None,
) -> list[dict[str, Any]]:
  """Paired differences against a reference, replicated over seeds.

  For every row: loss minus the loss of the reference run (is_ref) with the same init and
  data seeds (and the same ref_group, e.g. budget), on the same validation tokens (SE
  clustered by sequence). Per group(row): the mean of those per-seed differences with its
  SE over seeds (the error bar; seeds are the independent replicates), whether it clears
  2 SE, and the minimum detectable effect (2.84 SE). Groups keep the rows' order.
  """
  refs = {(ref_group(r), pair_key(r)): r for r in rows if ok(r) and is_ref(r)}
  groups: dict[Any, list[dict]] = {}
  for r in rows:
    if ok(r):
      groups.setdefault(group(r), []).append(r)
  out = []
  for g, rs in groups.items():
    per_seed = []
    for r in sorted(rs, key=pair_key):
      ref = refs.get((ref_group(r), pair_key(r)))
      if ref is None:
        continue
      d, se = (0.0, 0.0) if ref is r else paired_vs(r, ref)
      per_seed.append({"seed": pair_key(r)[0], "data_seed": pair_key(r)[1], "diff": d, "se_tokens": se})
    diffs = [p["diff"] for p in per_seed]
    mean, se = stats.mean_se(diffs) if diffs else (float("nan"), float("nan"))
    loss, loss_se = stats.mean_se([r["val_loss"] for r in rs])
    out.append(
      {
        "group": g,
        "seeds": [p["seed"] for p in per_seed],
        "diff_mean": mean,
        "diff_se": se,
        "claim": stats.clears(mean, se),
        "mde": stats.minimum_detectable_effect(se),
        "per_seed": per_seed,
        "val_loss_mean": loss,
        "val_loss_se_seeds": loss_se,
        "is_reference": all(is_ref(r) for r in rs),
      }
    )
  return out


def verdict(s: dict) -> str:
  if s["is_reference"]:
    return "reference"
  if not math.isfinite(s["diff_se"]):
    return "one seed: no error bar"
  if s["claim"]:
    return f"{'worse' if s['diff_mean'] > 0 else 'better'} (clears 2 SE)"
  return f"not detectable (MDE {s['mde']:.3f})"


def paired_table(summary: Sequence[dict], label: str, fmt_group: Callable[[Any], str] = str) -> str:
  """Markdown: group | seeds | mean loss | paired difference ± SE over seeds | per seed | verdict."""
  lines = [
    f"| {label} | seeds | val loss (mean ± SE over seeds) | vs reference, paired (± SE over seeds) | "
    "per seed (± SE over tokens) | verdict |",
    "|---|---:|---:|---:|---|---|",
  ]
  for s in summary:
    per = "; ".join(f"s{p['seed']}: {stats.format_pm(p['diff'], p['se_tokens'])}" for p in s["per_seed"])
    loss = stats.format_pm(s["val_loss_mean"], s["val_loss_se_seeds"]).lstrip("+")
    lines.append(
      f"| {fmt_group(s['group'])} | {len(s['seeds'])} | {loss} | "
      f"{stats.format_pm(s['diff_mean'], s['diff_se'])} | {per} | {verdict(s)} |"
    )
  return "\n".join(lines)


def plot_paired(
  summary: Sequence[dict],
  path: str | Path,
  *,
  title: str,
  label: str,
  x: Callable[[Any], float] | None = None,
  fmt_group: Callable[[Any], str] = str,
  xlabel: str | None = None,
  xscale: str | None = None,
  invert_x: bool = False,
  series: Callable[[Any], str] | None = None,
) -> Path:
  """Paired differences with ±1 SE (over seeds) error bars and the per-seed points; with x
  a line plot over x(group) (one line per series(group)), else horizontal bars."""
  fig, ax = new_figure(6.4, 4.0)
  ax.axhline(0, color="black", lw=0.8) if x is not None else ax.axvline(0, color="black", lw=0.8)
  if x is not None:
    by_series: dict[str, list[dict]] = {}
    for s in summary:
      by_series.setdefault(series(s["group"]) if series else "", []).append(s)
    for name, ss in by_series.items():
      ss = sorted(ss, key=lambda s: x(s["group"]))
      xs = [x(s["group"]) for s in ss]
      err = [0.0 if not math.isfinite(s["diff_se"]) else s["diff_se"] for s in ss]
      line = ax.errorbar(
        xs, [s["diff_mean"] for s in ss], yerr=err, fmt="o-", capsize=3, label=(name or "mean over seeds") + " ± 1 SE"
      )
      for s in ss:
        ax.plot(
          [x(s["group"])] * len(s["per_seed"]),
          [p["diff"] for p in s["per_seed"]],
          ".",
          color=line[0].get_color(),
          alpha=0.4,
        )
    ax.set_xlabel(xlabel or label)
    ax.set_ylabel("val loss minus reference (nats/token, paired)")
    if xscale:
      ax.set_xscale(xscale)
    if invert_x:
      ax.invert_xaxis()
    ax.legend(fontsize=8)
  else:
    labels = [fmt_group(s["group"]) for s in summary]
    err = [0.0 if not math.isfinite(s["diff_se"]) else s["diff_se"] for s in summary]
    ax.barh(
      labels,
      [s["diff_mean"] for s in summary],
      xerr=err,
      capsize=3,
      color=["tab:red" if s["diff_mean"] > 0 else "tab:green" for s in summary],
    )
    for i, s in enumerate(summary):
      ax.plot([p["diff"] for p in s["per_seed"]], [i] * len(s["per_seed"]), "k.", alpha=0.5)
    ax.set_xlabel("val loss minus reference (nats/token, paired; bars ± 1 SE over seeds)")
    ax.invert_yaxis()
  mdes = [s["mde"] for s in summary if not s["is_reference"] and math.isfinite(s["mde"])]
  if mdes:  # effects inside the band are below what this design detects with 80% power
    mde = float(sorted(mdes)[len(mdes) // 2])
    span = ax.axhspan if x is not None else ax.axvspan
    span(-mde, mde, color="gray", alpha=0.15, label=f"± median MDE ({mde:.3f})")
    ax.legend(fontsize=8)
  ax.set_title(title)
  return save_figure(fig, path)


def enable_compilation_cache(workdir: str | Path) -> None:
  """JAX's persistent compilation cache under workdir: runs that differ only in seed (or
  are resumed) skip recompiling their steps."""
  jax.config.update("jax_compilation_cache_dir", str(Path(workdir).resolve() / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def quiet_logs() -> None:
  """absl (orbax) logs every checkpoint at INFO; keep the experiment logs readable."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _try_lock(run_dir: Path) -> bool:
  """Claims run_dir for this process (a lock file holding the pid); a lock left by a dead
  process is taken over. False when a live process holds it."""
  run_dir.mkdir(parents=True, exist_ok=True)
  lock = run_dir / LOCK_FILE
  for _ in range(2):
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        pid = int(lock.read_text().strip() or -1)
      except (OSError, ValueError):
        pid = -1
      if pid == os.getpid():
        return True
      if pid > 0 and _pid_alive(pid):
        return False
      lock.unlink(missing_ok=True)  # stale
      continue
    with os.fdopen(fd, "w") as f:
      f.write(str(os.getpid()))
    return True
  return False


def _unlock(run_dir: Path) -> None:
  (run_dir / LOCK_FILE).unlink(missing_ok=True)


def missing_runs(variants: Sequence[Variant], workdir: str | Path) -> list[str]:
  """Names of the variants without a finished result under workdir."""
  return [v.name for v in variants if not (v.run_dir(Path(workdir)) / RESULT_FILE).is_file()]


def run_all(
  variants: Sequence[Variant], workdir: str | Path, *, poll_seconds: float = 10.0, train: bool = True
) -> list[dict[str, Any]]:
  """Runs (or reuses) every variant and returns their rows in order.

  Several processes may work on the same list at once (e.g. `run_all --workers`): each
  run directory is claimed with a lock file, a process skips runs another live process
  holds and, at the end, waits for their results. train=False only collects the finished
  runs (the others are left out of the rows; see `missing_runs`).
  """
  quiet_logs()
  workdir = Path(workdir)
  if not train:
    return [run_variant(v, workdir) for v in variants if (v.run_dir(workdir) / RESULT_FILE).is_file()]
  rows: dict[int, dict] = {}
  pending = list(enumerate(variants))
  while pending:
    deferred = []
    for i, v in pending:
      run_dir = v.run_dir(workdir)
      done = (run_dir / RESULT_FILE).is_file()
      if not done and not _try_lock(run_dir):
        deferred.append((i, v))
        continue
      try:
        if not done:
          print(f"[{i + 1}/{len(variants)}] {v.name} -> {run_dir}", flush=True)
        t0 = time.perf_counter()
        try:
          rows[i] = run_variant(v, workdir)
        except Exception as e:  # keep the other runs going; the failure is reported
          log.exception("run %s failed", v.name)
          (run_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n")
          print(f"    FAILED: {type(e).__name__}: {e}", flush=True)
          rows[i] = {"name": v.name, **v.info, "failed": f"{type(e).__name__}: {e}", "val_loss": float("nan")}
          continue
        if not done:
          print(f"    val_loss {rows[i]['val_loss']:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
      finally:
        if not done:
          _unlock(run_dir)
    if deferred and len(deferred) == len(pending):
      time.sleep(poll_seconds)  # every remaining run is being trained by another process
    pending = deferred
  return [rows[i] for i in range(len(variants))]


# ------------------------------------------------------------------------------- output
def run_and_report(
  name: str, planned, workdir: str, *, train: bool, summarize, parts: Sequence[str], plot: dict, references=False
) -> dict:
  """Trains (or reuses) the planned runs, then writes results.json, table.md and the plot
  under workdir/name. summarize(rows) -> (*values, table: str) is the experiment's own: the
  values go into results.json's meta under the names `parts` (one of them "paired", a
  `paired_summary`), which `plot_paired(**plot)` draws (without the reference unless
  `references`)."""
  rows = run_all(planned, workdir, train=train)
  missing = missing_runs(planned, workdir)
  *values, table = summarize(rows)
  extra = dict(zip(parts, values, strict=True))
  out = Path(workdir) / name
  shown = [s for s in extra["paired"] if references or not s["is_reference"]]
  png = plot_paired(shown, out / f"{name}.png", **plot)
  write_results(out, name, rows, meta={"missing_runs": missing, **extra, "plot": str(png)}, table=table)
  print(table)
  return {"rows": rows, **extra, "table": table, "plot": png}


def write_results(
  out_dir: str | Path, name: str, rows: list[dict], *, meta: dict | None = None, table: str | None = None
) -> Path:
  """out_dir/results.json (rows + meta + hardware) and out_dir/table.md."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  payload = {"experiment": name, "hardware": hardware(), "meta": meta or {}, "rows": rows}
  path = out / "results.json"
  path.write_text(json.dumps(payload, indent=1, default=str))
  if table is not None:
    (out / "table.md").write_text(table + "\n")
  return path


def markdown_table(rows: list[dict], columns: list[tuple[str, str, Callable[[Any], str]]]) -> str:
  """columns: (header, key, formatter)."""
  head = "| " + " | ".join(h for h, _, _ in columns) + " |"
  sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
  body = ["| " + " | ".join(f(r.get(k)) for _, k, f in columns) + " |" for r in rows]
  return "\n".join([head, sep] + body)


def fmt(spec: str) -> Callable[[Any], str]:
  return lambda v: "-" if v is None else format(v, spec)


def new_figure(width: float = 6.4, height: float = 4.0):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(width, height))
  ax.grid(alpha=0.3)
  return fig, ax


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
  """Writes `fig` to `path` (its folder made) and closes it."""
  import matplotlib.pyplot as plt

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path

"""gpu_check's goal summary, markdown record and README block."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from experiments.gpu_check.common import README_BEGIN, README_END, _json_default


# ------------------------------------------------------------------------------- summary
@dataclasses.dataclass(frozen=True)
class Goal:
  key: str
  text: str
  target: str


GOALS = (
  Goal("correctness", "GPU kernels and the Engram layer agree with the jnp reference", "every check passes"),
  Goal("gather_bw", "gather_rows bandwidth, rows >= 256 B", ">= 85% of copy bandwidth"),
  Goal("fused_fwd", "fused gather_gate vs XLA, forward (paper shapes)", ">= 1.3x"),
  Goal("fused_fwd_bwd", "fused gather_gate vs XLA, forward+backward", ">= 1.3x"),
  Goal("host_decode", "host-resident tables vs device tables, decode", ">= 0.99x device"),
  Goal("host_train", "host-resident tables vs device tables, training", ">= 0.97x device"),
  Goal("small_train", "small config train step: tokens/s and MFU", "recorded"),
)


def _step(rec: dict, name: str) -> dict:
  return next((s for s in rec["steps"] if s["name"] == name), {"status": "pending"})


def _cases(step: dict, key: str) -> list[dict]:
  return [c for c in (step.get("results") or {}).get(key, []) if isinstance(c, dict)]


def _unmeasured(step: dict, what: str) -> tuple[str, str]:
  """Status of a goal whose figure is missing: failed when its step failed or timed out."""
  st = step.get("status")
  if st in ("failed", "timed_out", "killed"):
    return "failed", f"{what}: step {st}" + (f" ({step['error'][:160]})" if step.get("error") else "")
  failed = [c for c in _cases(step, what) if c.get("status") == "failed"]
  if failed:
    return "failed", f"{failed[0]['name']}: {failed[0].get('error', '')[:160]}"
  return "not measured", f"step {st or 'pending'}"


def evaluate_goals(rec: dict) -> list[dict]:
  """Goal rows from whatever the record holds. Without a GPU (smoke) a goal that would be met
  or missed reads "not measured (CPU)"; failures read "failed" everywhere."""
  on_gpu = rec.get("mode") == "gpu" and _backend_of(rec) == "gpu"
  rows = []

  def row(goal: Goal, status: str, figure: str):
    if not on_gpu and status in ("met", "missed"):
      status = "not measured (CPU)"
    rows.append({"goal": goal.key, "text": goal.text, "target": goal.target, "status": status, "figure": figure})

  g = {x.key: x for x in GOALS}
  # correctness
  corr = _step(rec, "correctness")
  checks = _cases(corr, "checks")
  bad = [c for c in checks if c.get("status") not in ("ok", "skipped")]
  ran = [c for c in checks if c.get("status") != "skipped"]
  if bad:
    worst = bad[0]
    row(
      g["correctness"],
      "failed",
      f"{len(bad)}/{len(ran)} checks fail, e.g. {worst['name']}: "
      + (worst.get("error") or json.dumps(worst.get("rel_err") or worst.get("grad_rel_err")))[:200],
    )
  elif ran and corr.get("status") == "ok":
    row(g["correctness"], "met", f"{len(ran)}/{len(ran)} checks pass" + ("" if on_gpu else " (interpret mode)"))
  elif ran:
    row(
      g["correctness"],
      "failed" if corr.get("status") in ("timed_out", "killed", "failed") else "not measured",
      f"{len(ran)} checks pass, step {corr.get('status')}",
    )
  else:
    row(g["correctness"], *_unmeasured(corr, "checks"))
  # gather bandwidth (rows of 256 B and more: the worst case counts)
  look = _step(rec, "lookup")
  big = [c for c in _cases(look, "gather") if c.get("status") == "ok" and c.get("row_bytes", 0) >= 256]
  small = [c for c in _cases(look, "gather") if c.get("status") == "ok" and c.get("row_bytes", 0) < 256]
  if big:
    worst = min(big, key=lambda c: c["ratio_to_copy"])
    fig = (
      f"worst {worst['ratio_to_copy']:.1%} ({worst['pallas_GBps']:.0f} GB/s, "
      f"{worst['row_bytes']} B rows, R={worst['case']['rows']:,}) over {len(big)} cases"
    )
    if small:
      fig += "; 160 B rows: " + ", ".join(f"{c['ratio_to_copy']:.1%}" for c in small)
    row(g["gather_bw"], "met" if worst["ratio_to_copy"] >= 0.85 else "missed", fig)
  else:
    row(g["gather_bw"], *_unmeasured(look, "gather"))
  # fused vs XLA
  fused = [c for c in _cases(look, "fused") if c.get("status") == "ok"]
  for key, field, label in (("fused_fwd", "speedup_fwd", "fwd"), ("fused_fwd_bwd", "speedup_fwd_bwd", "fwd+bwd")):
    if fused:
      c = fused[0]
      fig = (
        f"{c[field]:.2f}x (xla {1e3 * c[f'xla_{label}_s']:.2f} ms, pallas "
        f"{1e3 * c[f'pallas_{label}_s']:.2f} ms, median; path {c.get('gpu_path') or 'n/a'})"
      )
      row(g[key], "met" if c[field] >= 1.3 else "missed", fig)
    else:
      row(g[key], *_unmeasured(look, "fused"))
  # host vs device
  off = _step(rec, "offload")
  serve = [c for c in _cases(off, "serve") if c.get("status") == "ok" and "host" in c.get("ratios", {})]
  if serve:  # the compiled decode loop with host rows read in the program: paired ratios
    r = serve[0]["ratios"]
    fig = f"host {r['host']['mean']:.3f} +- {r['host']['se']:.3f}x device (paired, serve.py dense)"
    if "cached" in r:
      fig += f"; cached {r['cached']['mean']:.3f} +- {r['cached']['se']:.3f}x"
    row(g["host_decode"], "met" if r["host"]["mean"] >= 0.99 else "missed", fig)
  for key, part, target in (("host_decode", "decode", 0.99), ("host_train", "train", 0.97)):
    if key == "host_decode" and serve:
      continue
    cases = {c["name"]: c for c in _cases(off, part) if c.get("status") == "ok"}
    if "device" in cases and "host" in cases:
      dev, host = cases["device"]["tokens_per_s"], cases["host"]["tokens_per_s"]
      fig = f"host {host / dev:.3f}x device ({host:,.0f} vs {dev:,.0f} tokens/s, median step)"
      if "cached" in cases:
        fig += f"; cached {cases['cached']['tokens_per_s'] / dev:.3f}x"
      row(g[key], "met" if host / dev >= target else "missed", fig)
    else:
      row(g[key], *_unmeasured(off, part))
  # small config throughput
  tr = _step(rec, "train")
  runs = [c for c in _cases(tr, "runs") if c.get("status") == "ok"]
  if runs:
    figs = []
    for c in runs:
      mfu = c.get("mfu_nominal")
      figs.append(
        f"{c['name']}: {c['tokens_per_s']:,.0f} +- {c['tokens_per_s_se']:,.0f} tokens/s, "
        f"{c['model_tflops']:.1f} TFLOP/s" + (f", MFU {mfu:.1%}" if mfu else "")
      )
    row(g["small_train"], "met", "; ".join(figs))
  else:
    row(g["small_train"], *_unmeasured(tr, "runs"))
  return rows


def _backend_of(rec: dict):
  return ((_step(rec, "env").get("results") or {}).get("device") or {}).get("backend")


def _fmt(x) -> str:
  if isinstance(x, float):
    return f"{x:.4g}"
  return str(x)


def render_markdown(rec: dict) -> str:
  env = _step(rec, "env").get("results") or {}
  dev, ver = env.get("device") or {}, env.get("versions") or {}
  meas = {c["name"]: c for c in env.get("measures", []) if c.get("status") == "ok"}
  lines = [
    f"# gpu_check ({rec.get('mode')}) started {rec.get('started')}, finished {rec.get('finished') or '(not finished)'}",
    "",
  ]
  if dev:
    mem = dev.get("memory_bytes")
    lines.append(
      f"Device: {dev.get('kind')} ({dev.get('backend')}, {dev.get('count')} device(s)"
      + (f", {mem / 2**30:.1f} GiB" if mem else "")
      + f"); jax {ver.get('jax')}, "
      f"jaxlib {ver.get('jaxlib')}" + "".join(f", {k} {v}" for k, v in ver.items() if k.startswith("jax-cuda"))
    )
  if "hbm_copy_bandwidth" in meas:
    lines.append(f"Copy bandwidth {meas['hbm_copy_bandwidth']['copy_GBps']:.1f} GB/s; ")
  if "bf16_matmul" in meas:
    m = meas["bf16_matmul"]
    lines.append(
      f"bf16 matmul {m['shape'][0]}^3: {m['tflops']:.1f} TFLOP/s "
      f"({m['median_ms']:.3f} ms median, mean {m['mean_ms']:.3f} +- {m['se_ms']:.3f} ms)."
    )
  lines += ["", "## Goals", "", "| goal | target | status | figure |", "| --- | --- | --- | --- |"]
  for r in rec.get("goals") or evaluate_goals(rec):
    lines.append(f"| {r['text']} | {r['target']} | **{r['status']}** | {r['figure']} |")
  lines += ["", "## Steps", "", "| step | status | budget s | wall s | note |", "| --- | --- | --- | --- | --- |"]
  for st in rec["steps"]:
    note = (st.get("error") or "").replace("\n", " ").replace("|", "/")[:200]
    lines.append(
      f"| {st['name']} | {st['status']} | {_fmt(st.get('budget_s'))} | {_fmt(st.get('wall_s', ''))} | {note} |"
    )
  for st in rec["steps"]:
    res = st.get("results") or {}
    cases = [(k, c) for k, v in res.items() if isinstance(v, list) for c in v if isinstance(c, dict)]
    if not cases:
      continue
    lines += ["", f"### {st['name']}", ""]
    for k, c in cases:
      keep = {kk: vv for kk, vv in c.items() if kk not in ("name", "status", "traceback", "case", "params")}
      lines.append(f"- {k} / {c['name']}: **{c.get('status')}** " + json.dumps(keep, default=_json_default)[:600])
  return "\n".join(lines) + "\n"


def readme_block(rec: dict) -> str:
  """The README's "GPU status" block for a record."""
  dev = (_step(rec, "env").get("results") or {}).get("device") or {}
  ver = (_step(rec, "env").get("results") or {}).get("versions") or {}
  on_gpu = rec.get("mode") == "gpu" and dev.get("backend") == "gpu"
  head = (
    f"Last check: {rec.get('started')}, {dev.get('kind', '?')}, jax {ver.get('jax', '?')}, "
    f"`{'make gpu-check' if on_gpu else 'gpu_check --smoke (CPU, interpret mode)'}`"
    f" ({rec.get('elapsed_s', '?')} s)."
  )
  if not on_gpu:
    head += " No GPU goal has been measured on a GPU yet."
  lines = [README_BEGIN, head, "", "| goal | target | status | figure |", "| --- | --- | --- | --- |"]
  for r in rec.get("goals") or evaluate_goals(rec):
    lines.append(f"| {r['text']} | {r['target']} | {r['status']} | {r['figure']} |")
  lines.append(README_END)
  return "\n".join(lines)


def update_readme(readme: Path, rec: dict) -> None:
  text = readme.read_text()
  pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
  if len(pattern.findall(text)) != 1:
    raise ValueError(
      f"{readme}: expected one block between {README_BEGIN!r} and {README_END!r}, found {len(pattern.findall(text))}"
    )
  readme.write_text(pattern.sub(lambda m: readme_block(rec), text))

"""experiments/gpu_check/: the smoke run (CPU, interpret mode) end to end with grain and
ml_collections made unimportable (the GPU image has neither), the record and summary it
leaves, budget enforcement, the goal logic on synthetic GPU records, and the README block."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import gpu_check as gc

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("grain", "ml_collections")


def _blocked_env(tmp_path: Path) -> dict:
  """Environment whose python cannot import grain or ml_collections (shadow packages that
  raise ImportError come first on PYTHONPATH, so every subprocess inherits the block)."""
  shadow = tmp_path / "shadow"
  for name in BLOCKED:
    (shadow / name).mkdir(parents=True)
    (shadow / name / "__init__.py").write_text(
      f"raise ImportError('{name} is blocked: the GPU image does not have it')\n"
    )
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(shadow), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run(args, env, timeout=600):
  return subprocess.run(
    [sys.executable, "-m", "experiments.gpu_check", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize(
  "modules",
  [
    # each step imports one of the bench modules (their absl flags clash in one process)
    "experiments.gpu_check engram_jax pallas_kernels experiments.bench.lookup",
    "experiments.bench.offload engram_jax.train.steps engram_jax.train.state engram_jax.train.optimizer",
  ],
)
def test_import_with_grain_and_ml_collections_poisoned(modules):
  code = (
    "import importlib, sys\n"
    + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED)
    + f"for m in {modules.split()!r}: importlib.import_module(m)\n"
  )
  r = subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO,
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": str(REPO)},
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-3000:]


def test_shadow_block_really_blocks(tmp_path):
  r = subprocess.run(
    [sys.executable, "-c", "import grain"], env=_blocked_env(tmp_path), capture_output=True, text=True, timeout=60
  )
  assert r.returncode != 0 and "blocked" in r.stderr


@pytest.mark.e2e
def test_smoke_run_record_summary_and_readme(tmp_path):
  """One test (one smoke run, even under pytest-xdist): the record, the summary, the README."""
  out = tmp_path / "out"
  r = _run(["--smoke", f"--out={out}"], _blocked_env(tmp_path))
  assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
  stdout = r.stdout
  rec = json.loads((out / gc.RECORD).read_text())
  assert rec["mode"] == "smoke" and rec["finished"]
  assert [s["name"] for s in rec["steps"]] == list(gc.STEPS)
  assert all(s["status"] == "ok" for s in rec["steps"]), [(s["name"], s.get("error")) for s in rec["steps"]]
  by = {s["name"]: s["results"] for s in rec["steps"]}
  assert by["env"]["device"]["backend"] == "cpu" and by["env"]["versions"]["jax"]
  assert {c["name"] for c in by["env"]["measures"]} == {"hbm_copy_bandwidth", "bf16_matmul"}
  checks = by["correctness"]["checks"]
  assert len(checks) == len(gc.SMOKE_GATHER) + len(gc.SMOKE_FUSED) + 1
  assert all(c["status"] == "ok" for c in checks)
  # both GPU gather_gate paths ran, as planned
  assert {c["gpu_path"] for c in checks if "gpu_path" in c} == {"fused", "fallback"}
  assert by["lookup"]["gather"][0]["pallas_s"] > 0 and by["lookup"]["fused"][0]["speedup_fwd_bwd"] > 0
  assert {c["name"] for c in by["offload"]["decode"]} == {"device", "host"}
  assert {c["name"] for c in by["offload"]["train"]} == {"device", "host"}
  assert by["train"]["runs"][0]["tokens_per_s"] > 0
  for name in gc.STEPS:
    assert (out / "steps" / f"{name}.json").exists() and (out / "steps" / f"{name}.log").exists()
  # summary: every goal present; on CPU none met or missed, none failed
  goals = {g["goal"]: g for g in rec["goals"]}
  assert set(goals) == {g.key for g in gc.GOALS}
  assert all(g["status"] == "not measured (CPU)" and g["figure"] for g in goals.values()), goals
  md = (out / gc.MARKDOWN).read_text()
  assert "| goal | target | status | figure |" in md and all(g.text in md for g in gc.GOALS)
  assert "## Goals" in stdout
  # README block from the smoke record
  readme = tmp_path / "README.md"
  shutil.copy(REPO / "README.md", readme)
  before = readme.read_text()
  r = _run([f"--update_readme_from={out}", f"--readme={readme}"], dict(os.environ))
  assert r.returncode == 0, r.stderr[-3000:]
  after = readme.read_text()
  block = after[after.index(gc.README_BEGIN) : after.index(gc.README_END)]
  assert "gpu_check --smoke" in block and "No GPU goal has been measured" in block
  assert all(g.text in block for g in gc.GOALS)
  # only the block changed
  strip = lambda t: t[: t.index(gc.README_BEGIN)] + t[t.index(gc.README_END) :]
  assert strip(after) == strip(before)
  readme.write_text("no markers here\n")
  with pytest.raises(ValueError, match="expected one block"):
    gc.update_readme(readme, json.loads((out / gc.RECORD).read_text()))


def test_step_over_budget_is_recorded_as_timed_out(tmp_path):
  out = tmp_path / "out"
  # env's budget scaled to ~0.6 s: the child cannot even import jax in time.
  r = _run(
    ["--smoke", f"--out={out}", "--steps=env", "--budget_scale=0.02", "--total_s=60"],
    _blocked_env(tmp_path),
    timeout=120,
  )
  assert r.returncode == 1
  rec = json.loads((out / gc.RECORD).read_text())
  (env,) = rec["steps"]
  assert env["status"] == "timed_out" and "budget" in env["error"]
  assert rec["finished"] and (out / gc.MARKDOWN).exists()


def _gpu_record(**steps):
  env = {"name": "env", "status": "ok", "results": {"device": {"backend": "gpu", "kind": "NVIDIA H200"}}}
  return {"mode": "gpu", "steps": [env] + [{"name": k, **v} for k, v in steps.items()]}


def _gather(ratio, row_bytes=256):
  return {
    "name": "g",
    "status": "ok",
    "ratio_to_copy": ratio,
    "pallas_GBps": 4000 * ratio,
    "row_bytes": row_bytes,
    "case": {"rows": 10},
  }


def test_goal_logic_on_gpu_records():
  fused = {
    "name": "f",
    "status": "ok",
    "speedup_fwd": 1.5,
    "speedup_fwd_bwd": 1.1,
    "xla_fwd_s": 1.5,
    "pallas_fwd_s": 1.0,
    "xla_fwd+bwd_s": 1.1,
    "pallas_fwd+bwd_s": 1.0,
    "gpu_path": "fused",
  }
  place = lambda dev, host: [
    {"name": "device", "status": "ok", "tokens_per_s": dev},
    {"name": "host", "status": "ok", "tokens_per_s": host},
  ]
  rec = _gpu_record(
    correctness={
      "status": "failed",
      "results": {
        "checks": [{"name": "a", "status": "ok"}, {"name": "b", "status": "mismatch", "rel_err": {"u": 0.5}}]
      },
    },
    lookup={
      "status": "ok",
      "results": {"gather": [_gather(0.9), _gather(0.84, 512), _gather(0.5, 160)], "fused": [fused]},
    },
    offload={"status": "ok", "results": {"decode": place(100.0, 99.5), "train": place(100.0, 96.0)}},
    train={"status": "timed_out", "error": "killed after its budget of 65 s", "results": {}},
  )
  g = {r["goal"]: r for r in gc.evaluate_goals(rec)}
  assert g["correctness"]["status"] == "failed" and "1/2" in g["correctness"]["figure"]
  assert g["gather_bw"]["status"] == "missed" and "84.0%" in g["gather_bw"]["figure"]  # the worst >= 256 B
  assert g["fused_fwd"]["status"] == "met" and g["fused_fwd_bwd"]["status"] == "missed"
  assert g["host_decode"]["status"] == "met" and g["host_train"]["status"] == "missed"
  assert g["small_train"]["status"] == "failed" and "timed_out" in g["small_train"]["figure"]
  rec = _gpu_record(lookup={"status": "ok", "results": {"gather": [_gather(0.9), _gather(0.86, 2048)]}})
  g = {r["goal"]: r for r in gc.evaluate_goals(rec)}
  assert g["gather_bw"]["status"] == "met"
  assert g["fused_fwd"]["status"] == "not measured"  # lookup ok but no fused case
  assert g["host_decode"]["status"] == "not measured"  # offload never ran
  # the same figures from a CPU run neither meet nor miss a GPU goal
  rec["mode"] = "smoke"
  assert gc.evaluate_goals(rec)[1]["status"] == "not measured (CPU)"


def test_small_model_config_matches_experiments_configs_small():
  from experiments.configs import common, small

  assert gc.small_model_config() == common.model_config(small.get_config("engram"))


def test_parse_ptxas():
  text = (
    "ptxas info    : 0 bytes gmem\n"
    "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
    "ptxas info    : Function properties for k\n"
    "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
    "ptxas info    : Used 109 registers, used 3 barriers, 1 bytes smem\n"
  )
  assert gc.parse_ptxas(text) == [
    {
      "function": "k",
      "arch": "sm_90a",
      "stack_bytes": 8,
      "spill_store_bytes": 4,
      "spill_load_bytes": 12,
      "registers": 109,
      "barriers": 3,
      "static_smem_bytes": 1,
    }
  ]


def _has_cuda_compile_toolchain() -> bool:
  import importlib.util

  has_plugin = (
    importlib.util.find_spec("jax_plugins") is not None
    and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  )
  return has_plugin and (shutil.which("ptxas") is not None or importlib.util.find_spec("nvidia") is not None)


@pytest.mark.skipif(
  not _has_cuda_compile_toolchain(), reason="needs jax-cuda12-plugin/pjrt and ptxas: run `make gpu-compile`"
)
def test_compile_sm90_without_gpu(tmp_path):
  """Both Mosaic GPU kernels go through Mosaic, LLVM NVPTX and ptxas for sm_90a at every
  correctness shape, with no GPU: ptxas errors and register spills fail here."""
  r = _run(["--compile_sm90", f"--out={tmp_path}"], {**os.environ, "JAX_PLATFORMS": "cpu"})
  rec = json.loads((tmp_path / gc.COMPILE_RECORD).read_text())
  assert len(rec["cases"]) == len(gc.GPU_GATHER) + len(gc.GPU_FUSED)
  bad = [(c["name"], c["status"], c.get("error", "")[:500]) for c in rec["cases"] if c["status"] != "ok"]
  assert not bad and r.returncode == 0, bad or r.stdout[-3000:]
  for c in rec["cases"]:
    assert c["kernels"] and all(k["arch"] == "sm_90a" and k["registers"] > 0 for k in c["kernels"])
  assert {c["gpu_path"] for c in rec["cases"] if c["gpu_path"]} == {"fused", "fallback"}
  (train,) = rec["train_steps"]  # the tiny model's whole train step, compiled for the H200
  assert train["status"] == "ok" and train["temp_bytes"] > 0 and train["argument_bytes"] > 0


def test_full_mode_without_gpu_stops_after_env(tmp_path):
  out = tmp_path / "out"
  r = _run([f"--out={out}"], _blocked_env(tmp_path), timeout=300)
  assert r.returncode == 1
  rec = json.loads((out / gc.RECORD).read_text())
  assert rec["mode"] == "gpu" and rec["steps"][0]["status"] == "ok"
  assert all(s["status"] == "skipped" and "no GPU" in s["error"] for s in rec["steps"][1:])
  goals = {g["goal"]: g["status"] for g in rec["goals"]}
  assert set(goals.values()) == {"not measured"}, goals

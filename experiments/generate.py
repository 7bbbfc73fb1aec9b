r"""Continue prompts with a trained run and report prefill and decode speed.

  python -m experiments.generate --checkpoint=runs/tiny/engram --prompt="def main(" \
      [--prompt="another prompt" ...] [--max_new_tokens=64 --temperature=0.8 --top_k=50 \
      --top_p=0.95 --greedy --seed=0 --table_placement=host --tables=host --step=300 \
      --host_decode=auto --repeat=2]

Prompts are encoded as in training (no special tokens; documents end with <eos>), batched
(right-padded) and generated together; each stops at <eos> or after max_new_tokens.
Times exclude compilation (printed separately). --tables=host loads a run trained with
host-placed tables without putting those tables on the device (generation then uses
--table_placement=host, the default with --tables=host). With host tables the rows are read
from host memory inside the compiled decode loop (--host_decode=auto/in_loop) or, as a
fallback, per token with NumPy (--host_decode=python); the decode path that ran is printed.
Bad flag values (max_new_tokens < 1, temperature < 0, top_k < 0, top_p outside (0, 1], an
empty prompt or one that encodes to no tokens) stop the script with an error naming the flag.
"""

from __future__ import annotations

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory or its checkpoints/ folder.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
_GREEDY = flags.DEFINE_bool("greedy", False, "Argmax decoding.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_PLACEMENT = flags.DEFINE_enum(
  "table_placement",
  "device",
  ["device", "host"],
  "Engram tables on the accelerator or in host memory (rows read from host memory inside the compiled decode loop).",
)
_HOST_DECODE = flags.DEFINE_enum(
  "host_decode",
  "auto",
  ["auto", "in_loop", "python"],
  "Host tables: in-loop reads (auto picks them when the device has host memory) or the per-token NumPy fallback.",
)
_TABLES = flags.DEFINE_enum(
  "tables",
  "device",
  ["device", "host"],
  "Where the host-placed Engram tables of a run trained with "
  "table_placement=host/cached go on loading; host needs "
  "--table_placement=host.",
)
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "Stop a sequence at the <eos> token.")
_REPEAT = flags.DEFINE_integer(
  "repeat",
  2,
  "Generate this many times and report the last run (the first run pays one-time costs besides compilation).",
)


def check_generation_flags(*, max_new_tokens, temperature, top_k, top_p, repeat, prompts) -> None:
  """Raises app.UsageError naming the flag of the first bad value."""
  if max_new_tokens < 1:
    raise app.UsageError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
  if not 0 <= temperature < float("inf"):
    raise app.UsageError(f"--temperature must be a finite number >= 0, got {temperature}")
  if top_k < 0:
    raise app.UsageError(f"--top_k must be >= 0 (0 = all tokens), got {top_k}")
  if not 0 < top_p <= 1:
    raise app.UsageError(f"--top_p must lie in (0, 1], got {top_p}")
  if repeat < 1:
    raise app.UsageError(f"--repeat must be >= 1, got {repeat}")
  for i, text in enumerate(prompts):
    if not text:
      raise app.UsageError(f"--prompt number {i} is empty")


def main(argv):
  del argv
  checked = ("max_new_tokens", "temperature", "top_k", "top_p", "repeat")  # the flags' names
  check_generation_flags(prompts=_PROMPT.value, **{name: flags.FLAGS[name].value for name in checked})
  from engram_jax.data import special_ids
  from engram_jax.inference import Generator, SamplingConfig
  from engram_jax.models.offloaded import split_tables
  from engram_jax.train.restore import load_run

  placement = _PLACEMENT.value
  if _TABLES.value == "host":
    if flags.FLAGS["table_placement"].present and placement != "host":
      raise app.UsageError(
        f"--tables=host keeps tables off the device: it needs --table_placement=host, got {placement}"
      )
    placement = "host"
  if _HOST_DECODE.value != "auto" and placement != "host":
    raise app.UsageError(f"--host_decode={_HOST_DECODE.value} needs --table_placement=host")
  run = load_run(_CHECKPOINT.value, step=_STEP.value, tables=_TABLES.value)
  eos = special_ids(run.tokenizer).eos
  prompts = [run.tokenizer.encode(p, add_special_tokens=False).ids for p in _PROMPT.value]
  for text, ids in zip(_PROMPT.value, prompts):
    if not ids:
      raise app.UsageError(f"--prompt={text!r} encodes to no tokens")
  sampling = SamplingConfig(
    temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, greedy=_GREEDY.value
  )
  has_engram = run.hasher is not None
  extra = {"host_decode": _HOST_DECODE.value} if placement == "host" else {}
  stores = run.stores
  if placement == "host" and not run.host_tables:  # a device run's tables, copied to host memory
    stores = split_tables(run.model, "host")[1].stores
  generator = Generator(run.model, run.hasher, run.compressor if has_engram else None, stores=stores, **extra)
  compile_seconds = 0.0
  for _ in range(_REPEAT.value):
    result = generator(
      prompts,
      max_new_tokens=_MAX_NEW.value,
      sampling=sampling,
      seed=_SEED.value,
      eos_id=eos if _STOP_AT_EOS.value else None,
    )
    compile_seconds += result.compile_seconds

  print(
    f"run {_CHECKPOINT.value} step {run.step} ({run.model_config.family}), "
    f"tables on {placement} (decode path {result.decode_path}), {sampling}"
  )
  for text, prompt, cont in zip(_PROMPT.value, prompts, result.tokens):
    stop = " <eos>" if cont and cont[-1] == eos and _STOP_AT_EOS.value else ""
    body = cont[:-1] if stop else cont
    print(f"--- prompt ({len(prompt)} tokens): {text!r}")
    print(f"+++ continuation ({len(cont)} tokens{stop}): {run.tokenizer.decode(body, skip_special_tokens=False)!r}")
  print(
    f"prefill: {result.prompt_tokens} tokens in {result.prefill_seconds * 1e3:.1f} ms "
    f"= {result.prefill_tokens_per_second:,.0f} tokens/s"
  )
  print(
    f"decode:  {result.generated_tokens - len(prompts)} tokens in {result.decode_steps} "
    f"steps, {result.decode_seconds * 1e3:.1f} ms = {result.tokens_per_second:,.0f} tokens/s, "
    f"{result.host_bytes_per_token:,.0f} bytes host -> device per token"
  )
  print(f"compile: {compile_seconds:.1f} s (excluded above; timings from run {_REPEAT.value} of {_REPEAT.value})")


if __name__ == "__main__":
  app.run(main)

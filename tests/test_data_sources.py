"""Source specs, the stdlib corpus and its stable split, text / JSONL / ArrayRecord readers."""

import json
import os
import subprocess
import sys

import pytest

from engram_jax.data import DataConfig, build_corpus, parse_source, stdlib_files
from engram_jax.data import corpus as corpus_lib
from engram_jax.data.sources import SourceSpec

# -- specs and config ------------------------------------------------------------------------


def test_parse_source_forms():
  assert parse_source("stdlib") == SourceSpec("stdlib")
  assert parse_source("text:/d/*.txt") == SourceSpec("text", "/d/*.txt")
  assert parse_source("jsonl:/d/*.jsonl:body") == SourceSpec("jsonl", "/d/*.jsonl", "body")
  assert parse_source("jsonl:/d/*.jsonl") == SourceSpec("jsonl", "/d/*.jsonl", "text")
  assert parse_source("arrayrecord:/d/x.array_record") == SourceSpec("arrayrecord", "/d/x.array_record", None)
  assert parse_source("arrayrecord:/d/*.array_record:text").field == "text"


@pytest.mark.parametrize(
  "spec, message",
  [
    ("parquet:/x/*.parquet", "unknown source scheme 'parquet'"),
    ("text:", "needs a file glob"),
    ("stdlib:foo", "takes no arguments"),
    ("", "non-empty string"),
  ],
)
def test_parse_source_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    parse_source(spec)


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"seq_len": 0}, "seq_len must be an int >= 1"),
    ({"batch_size": -2}, "batch_size"),
    ({"num_workers": -1}, "num_workers"),
    ({"bpe_vocab_size": 100}, "too small for a byte-level BPE"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"sources": ()}, "sources is empty"),
    ({"sources": ("csv:/a",)}, "unknown source scheme 'csv'"),
    ({"seed": -1}, "seed"),
  ],
)
def test_data_config_rejects_bad_values(changes, message):
  with pytest.raises(ValueError, match=message):
    DataConfig(**changes)


def test_data_config_round_trips_and_accepts_a_string_source():
  cfg = DataConfig(sources="stdlib", seq_len=8)
  assert cfg.sources == ("stdlib",)
  assert DataConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown fields"):
    DataConfig.from_dict({"seq_length": 3})


def test_glob_without_matches_names_the_pattern(tmp_path):
  with pytest.raises(ValueError, match="no files match .*nothing_here"):
    build_corpus([f"text:{tmp_path}/nothing_here*.txt"], None)


# -- stdlib corpus ------------------------------------------------------------------------------


def test_stdlib_files_are_sorted_portable_and_nonempty():
  files = stdlib_files(include_tests=True)
  keys = [k for k, _ in files]
  assert keys == sorted(keys) and len(set(keys)) == len(keys)
  assert "os.py" in keys and "json/__init__.py" in keys
  assert not any(k.startswith(("site-packages/", "_sysconfigdata")) for k in keys)
  assert all(p.stat().st_size > 0 for _, p in files)
  total = sum(p.stat().st_size for _, p in files)
  assert 10e6 < total < 80e6  # the whole library, not a sample
  no_tests = {k for k, _ in stdlib_files(include_tests=False)}
  assert no_tests < set(keys)
  assert not any(part in ("test", "tests", "idle_test") for k in no_tests for part in k.split("/")[:-1])


def test_stdlib_split_is_deterministic_disjoint_and_complete():
  kw = {"validation_fraction": 0.1, "stdlib_include_tests": False}
  train = build_corpus(["stdlib"], "train", **kw)
  val = build_corpus(["stdlib"], "validation", **kw)
  train_keys, val_keys = set(train.keys()), set(val.keys())
  assert not train_keys & val_keys
  assert train_keys | val_keys == {k for k, _ in stdlib_files(include_tests=False)}
  assert 0.05 < len(val_keys) / (len(train_keys) + len(val_keys)) < 0.15
  assert build_corpus(["stdlib"], "validation", **kw).keys() == val.keys()
  assert all(corpus_lib.split_of(k, 0.1) == "validation" for k in val_keys)
  # A document is its file's text.
  i = val.keys().index(next(iter(sorted(val_keys))))
  assert val[i] == (corpus_lib.stdlib_root() / val.key(i)).read_text(errors="replace")


def test_split_does_not_depend_on_python_hash_seed():
  # Load corpus.py alone (no package import) in fresh interpreters with different salts.
  code = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('c', {corpus_lib.__file__!r})\n"
    "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
    "keys = [k for k, _ in m.stdlib_files(include_tests=False)]\n"
    "print(sum(1 << (i % 61) for i, k in enumerate(keys) if m.split_of(k, 0.3) == 'train'))\n"
  )
  outs = set()
  for salt in ("1", "2"):
    env = {**os.environ, "PYTHONHASHSEED": salt}
    outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
  keys = [k for k, _ in stdlib_files(include_tests=False)]
  here = sum(1 << (i % 61) for i, k in enumerate(keys) if corpus_lib.split_of(k, 0.3) == "train")
  assert outs == {f"{here}\n"}


def test_caps_take_a_prefix_of_the_fixed_order():
  full = build_corpus(["stdlib"], "train", validation_fraction=0.1, stdlib_include_tests=False)
  capped = build_corpus(["stdlib"], "train", validation_fraction=0.1, max_documents=7, stdlib_include_tests=False)
  assert capped.keys() == full.keys()[:7]
  by_bytes = build_corpus(["stdlib"], "train", validation_fraction=0.1, max_bytes=200_000, stdlib_include_tests=False)
  sizes = [len(by_bytes[i].encode()) for i in range(len(by_bytes))]
  assert sum(sizes) <= 200_000 and len(by_bytes) >= 1
  assert by_bytes.keys() == full.keys()[: len(by_bytes)]
  next_size = len(full[len(by_bytes)].encode())
  assert sum(sizes) + next_size > 200_000  # the longest prefix under the cap


# -- text / jsonl / arrayrecord ------------------------------------------------------------------


def test_text_source_reads_files_and_skips_empty_ones(tmp_path):
  (tmp_path / "a.txt").write_text("alpha document")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.txt").write_text("béta")
  (tmp_path / "empty.txt").write_text("")
  corpus = build_corpus([f"text:{tmp_path}/**/*.txt"], None)
  docs = {corpus.key(i): corpus[i] for i in range(len(corpus))}
  assert docs == {"a.txt": "alpha document", "sub/b.txt": "béta"}


def test_split_keys_do_not_depend_on_where_the_data_lives(tmp_path):
  for d in ("x", "y/deeper"):
    (tmp_path / d).mkdir(parents=True)
    for i in range(40):
      (tmp_path / d / f"doc{i}.txt").write_text(f"document {i}")
  a = build_corpus([f"text:{tmp_path}/x/*.txt"], "validation", validation_fraction=0.3)
  b = build_corpus([f"text:{tmp_path}/y/deeper/*.txt"], "validation", validation_fraction=0.3)
  assert a.keys() == b.keys() and 0 < len(a) < 40


def test_jsonl_source(tmp_path):
  rows = [{"body": "first", "id": 1}, {"body": "second ✓"}, {"body": "third"}]
  (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n")
  (tmp_path / "b.jsonl").write_text(json.dumps(rows[2]))  # no trailing newline
  corpus = build_corpus([f"jsonl:{tmp_path}/*.jsonl:body"], None)
  docs = {corpus.key(i): corpus[i] for i in range(len(corpus))}
  assert docs == {"a.jsonl:0": "first", "a.jsonl:1": "second ✓", "b.jsonl:0": "third"}

  missing = build_corpus([f"jsonl:{tmp_path}/a.jsonl:title"], None)
  with pytest.raises(ValueError, match="no field 'title'"):
    missing[0]
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n')
  bad = build_corpus([f"jsonl:{tmp_path}/bad.jsonl"], None)
  texts = []
  with pytest.raises(ValueError, match="not valid JSON"):
    for i in range(len(bad)):
      texts.append(bad[i])


def test_arrayrecord_source(tmp_path):
  from array_record.python import array_record_module

  def write(path, records):
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
      writer.write(r.encode("utf-8"))
    writer.close()

  write(tmp_path / "plain.array_record", ["one", "twö", "three"])
  write(tmp_path / "json.array_record", [json.dumps({"text": t}) for t in ("x y", "z")])
  plain = build_corpus([f"arrayrecord:{tmp_path}/plain.array_record"], None)
  assert sorted(plain[i] for i in range(len(plain))) == ["one", "three", "twö"]
  assert sorted(plain.keys()) == ["plain.array_record:0", "plain.array_record:1", "plain.array_record:2"]
  fielded = build_corpus([f"arrayrecord:{tmp_path}/json.array_record:text"], None)
  assert sorted(fielded[i] for i in range(len(fielded))) == ["x y", "z"]
  # Readers reopen after pickling (grain worker processes).
  import pickle

  again = pickle.loads(pickle.dumps(plain))
  assert [again[i] for i in range(3)] == [plain[i] for i in range(3)]


def test_sources_combine(tmp_path):
  (tmp_path / "a.txt").write_text("from a text file")
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
  corpus = build_corpus([f"text:{tmp_path}/*.txt", f"jsonl:{tmp_path}/*.jsonl"], None)
  assert sorted(corpus[i] for i in range(len(corpus))) == ["from a text file", "from jsonl"]

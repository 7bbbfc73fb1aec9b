"""Checked inputs (issue 14): out-of-range row ids and out-of-vocabulary ids under jit,
undecodable and binary data files, config fields from the command line, tokenizer files,
config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

from engram_jax import Engram, EngramConfig, NgramHasher
from engram_jax.layers.engram import NgramInputAverage

CFG = EngramConfig(
  vocab_sizes=(37, 41), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=16, layer_ids=(1,), pad_id=0
)
HASHER = NgramHasher(CFG, 50)
SIZES = HASHER.table_sizes[1]  # [37, 41, 43, 47]
D_H = CFG.head_dim


def _engram(impl="xla", hc=1):
  return Engram(CFG, 1, 8, hc, table_sizes=SIZES, impl=impl, rngs=nnx.Rngs(0))


def _boundary_ids():
  """[1, 3, H] valid ids, with head 0 of token 1 at its own size (the first row of head 1
  in the flat table) and head 2 of token 2 at -1 (the last row of head 1)."""
  ids = np.array([[[1, 2, 3, 4], [SIZES[0], 5, 6, 7], [8, 9, -1, 10]]], np.int32)
  return ids, [(0, 1, 0), (0, 2, 2)]


def _nan_heads(rows):
  return np.isnan(np.asarray(rows)).reshape(rows.shape[:-1] + (-1, D_H)).all(-1)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_out_of_range_id_under_jit_reads_nan_for_its_head_only(impl):
  """Defect 4: the per-head offset was added before the bounds handling, so head 0's id
  37 of 37 read head 1's row 0 (and -1 the previous head's last row)."""
  module = _engram(impl)
  ids, bad = _boundary_ids()
  rows = jax.jit(module.lookup)(ids)
  want = np.zeros((1, 3, 4), bool)
  for p in bad:
    want[p] = True
  np.testing.assert_array_equal(_nan_heads(rows), want)
  # every valid head still reads its own row
  table = np.asarray(module.table[...])
  offsets = np.asarray(module.offsets)
  expect = table[np.clip(ids, 0, None) + offsets].reshape(rows.shape)
  ok = ~np.repeat(want, D_H, axis=-1)
  np.testing.assert_array_equal(np.asarray(rows)[ok], expect[ok])


def test_pallas_fused_gather_gate_marks_bad_tokens_nan():
  """impl="pallas" with a gate runs the fused kernel (rows never materialize): a token with an
  invalid id gets a NaN output and gates, the others equal the xla path."""
  module = _engram("pallas")
  ids, _ = _boundary_ids()
  hidden = jax.random.normal(jax.random.key(0), (1, 3, 8))
  y, gates = jax.jit(lambda h, r: module(h, r, return_gates=True))(hidden, ids)
  bad_token = np.array([False, True, True])
  assert np.isnan(np.asarray(y))[0, bad_token].all() and np.isnan(np.asarray(gates))[0, bad_token].all()
  module.impl = "xla"
  y_ref = module(hidden, np.where(ids < 0, 0, ids) % SIZES)  # any valid ids for token 0's reference
  np.testing.assert_allclose(np.asarray(y)[0, 0], np.asarray(y_ref)[0, 0], atol=2e-5, rtol=2e-5)
  assert np.isfinite(np.asarray(y_ref)).all()


def test_checkify_raises_with_the_position_of_a_bad_row_id():
  module = _engram()
  graphdef, state = nnx.split(module)
  ids, _ = _boundary_ids()
  checked = jax.jit(checkify.checkify(lambda s, r: nnx.merge(graphdef, s).lookup(r), errors=checkify.user_checks))
  err, _ = checked(state, ids)
  with pytest.raises(
    checkify.JaxRuntimeError,
    match=r"row id 37 at position \(0, 1, 0\) is outside head 0's table \[0, 37\) "
    r"of Engram layer 1",
  ):
    err.throw()
  err, rows = checked(state, np.where(ids < 0, 0, ids) % SIZES)
  assert err.get() is None and np.isfinite(np.asarray(rows)).all()
  # eager (concrete) ids were and stay a ValueError
  with pytest.raises(ValueError, match="outside head 0's table"):
    module.lookup(ids)


def test_gradient_of_a_bad_id_does_not_reach_a_neighbours_row():
  module = _engram()
  graphdef, params = nnx.split(module, nnx.Param)
  ids, _ = _boundary_ids()

  def loss(p):
    rows = nnx.merge(graphdef, p).lookup(ids)
    return jnp.sum(jnp.where(jnp.isnan(rows), 0.0, rows))

  grad = np.asarray(jax.jit(jax.grad(loss))(params)["table"][...])
  # head 1's row 0 (flat SIZES[0]) and head 1's last row (flat SIZES[0]+SIZES[1]-1) were the
  # neighbours the bad ids used to read: only the valid id 5 of head 1 (flat SIZES[0]+5) gets gradient.
  assert not grad[SIZES[0]].any() and not grad[SIZES[0] + SIZES[1] - 1].any()
  assert grad[SIZES[0] + 5].all()


def test_ngram_input_average_bounds_checked_per_head():
  avg = NgramInputAverage(CFG, 1, 8, table_sizes=SIZES, rngs=nnx.Rngs(0))
  ids, _ = _boundary_ids()
  out = np.asarray(jax.jit(avg)(ids))
  np.testing.assert_array_equal(np.isnan(out).all(-1), [[False, True, True]])
  with pytest.raises(ValueError, match=r"row id 37 at position \(0, 1, 0\) is outside head 0's table"):
    avg(ids)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("method", ["all_to_all", "xla"])
def test_sharded_lookup_bounds_checked_per_head(method):
  from engram_jax import sharding as S
  from engram_jax.models import ModelConfig, Transformer

  config = ModelConfig.tiny("engram_moe", engram=CFG, engram_row_multiple=8, engram_sharded_lookup=method)
  mesh = S.make_mesh(data=2, tensor=4)
  model = S.create_sharded(lambda: Transformer(config, rngs=nnx.Rngs(0)), mesh)
  engram = model.blocks[1].engram
  assert S.num_shards(engram.table.get_value()) == 4
  ids, bad = _boundary_ids()
  ids = np.concatenate([ids, ids[:, ::-1]], 0)  # batch 2: one per data shard
  graphdef, state = nnx.split(engram)
  with jax.set_mesh(mesh):
    rows = jax.jit(lambda s, r: nnx.merge(graphdef, s).lookup(r))(state, ids)
  want = np.zeros((2, 3, 4), bool)
  for _, t, h in bad:
    want[0, t, h] = want[1, 2 - t, h] = True
  np.testing.assert_array_equal(_nan_heads(rows), want)


def test_hash_jax_out_of_vocabulary_ids_are_not_ordinary_rows():
  """Defect 4: under jit hash_jax hashed an id >= V' (or < 0) into an ordinary row."""
  x = np.array([[1, 2, 60, 3, 4, 5], [1, 2, 3, -3, 4, 5]], np.int32)
  rows = np.asarray(jax.jit(HASHER.hash_jax)(x)[1])
  # the n-grams that read the bad id (orders 2 and 3: heads 0-1, 2-3) get -1, the rest are exact
  bad = np.zeros(rows.shape, bool)
  for b, t in ((0, 2), (1, 3)):
    bad[b, t, :] = True
    bad[b, t + 1, :] = True  # order 2 and 3 windows of the next token
    bad[b, t + 2, 2:] = True  # order 3 window of the token after
  np.testing.assert_array_equal(rows == -1, bad)
  clean = HASHER.hash(np.where((x < 0) | (x >= 50), 0, x))[1]
  np.testing.assert_array_equal(rows[~bad], clean[~bad])
  # and Engram reads NaN for them
  assert _nan_heads(jax.jit(_engram().lookup)(rows))[bad].all()
  # with documents: a bad id in one document does not spoil the next one
  seg = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
  rows = np.asarray(jax.jit(HASHER.hash_jax)(x, seg)[1])
  assert (rows[0, 3:] >= 0).all() and (rows[0, 2] == -1).all()


def test_hash_jax_checkify_raises_with_position():
  x = np.array([[1, 2, 3], [4, 50, 6]], np.int32)
  err, _ = jax.jit(checkify.checkify(HASHER.hash_jax, errors=checkify.user_checks))(x)
  with pytest.raises(
    checkify.JaxRuntimeError,
    match=r"compressed id 50 at position \(1, 1\) is outside the compressed vocabulary \[0, 50\)",
  ):
    err.throw()
  with pytest.raises(ValueError, match="compressed id 50 at position"):
    HASHER.hash_jax(x)


def test_host_row_store_checks_row_ids_per_head():
  from engram_jax.offload import HostTable
  from engram_jax.offload.indexing import RowIndex
  from engram_jax.offload.row_store import HostRowStore

  flat_sizes = int(SIZES.sum())
  table = HostTable(np.arange(flat_sizes * 2, dtype=np.float32).reshape(flat_sizes, 2))
  store = HostRowStore(1, table, RowIndex(tuple(SIZES)))
  offsets = HASHER.offsets[1]
  ids, _ = _boundary_ids()
  with pytest.raises(ValueError, match=r"row id 37 at position \(0, 1, 0\) is outside head 0's table \[0, 37\)"):
    store.flat_ids(ids)
  good = np.where(ids < 0, 0, ids) % SIZES
  np.testing.assert_array_equal(np.asarray(store.gather(store.flat_ids(good))), table.numpy()[good + offsets])


# ------------------------------------------------------------------ defect 5: data files
def _files(tmp_path):
  d = tmp_path / "docs"
  d.mkdir()
  (d / "a.txt").write_text("plain text\n")
  (d / "b.txt").write_bytes("caf\u00e9\n".encode() + b"latin-1 \xe9t\xe9\n")  # byte 14 is bad
  (d / "c.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
  return d


def test_undecodable_text_file_is_refused_naming_file_and_offset(tmp_path):
  from engram_jax.data import DataConfig
  from engram_jax.data.pipeline import train_corpus

  d = _files(tmp_path)
  config = DataConfig(sources=(f"text:{d}/*.txt",), eval_sources=(f"text:{d}/a.txt",))
  with pytest.raises(ValueError, match=r"b\.txt: not valid utf-8 at byte offset 14 .*decode_errors='skip'"):
    train_corpus(config)


def test_decode_errors_skip_and_replace(tmp_path, caplog):
  from engram_jax.data import DataConfig
  from engram_jax.data.pipeline import train_corpus

  d = _files(tmp_path)
  base = DataConfig(sources=(f"text:{d}/*.txt",), eval_sources=(f"text:{d}/a.txt",))
  with caplog.at_level("WARNING", logger="engram_jax.data.sources"):
    skipped = train_corpus(base.replace(decode_errors="skip"))
  assert skipped.keys() == ["a.txt"]
  assert "skipped 1 binary file(s)" in caplog.text and "c.txt" in caplog.text
  assert "skipped 1 undecodable file(s)" in caplog.text and "b.txt (byte 14)" in caplog.text
  replaced = train_corpus(base.replace(decode_errors="replace"))
  docs = {replaced.key(i): replaced[i] for i in range(len(replaced))}
  assert set(docs) == {"a.txt", "b.txt"}  # the binary file never is a document
  assert docs["b.txt"] == "caf\u00e9\nlatin-1 \ufffdt\ufffd\n"
  with pytest.raises(ValueError, match=r"DataConfig.decode_errors must be one of .* got 'ignore'"):
    base.replace(decode_errors="ignore")


def test_binary_file_skipped_even_when_replacing(tmp_path, caplog):
  from engram_jax.data.sources import open_source

  d = _files(tmp_path)
  with caplog.at_level("WARNING", logger="engram_jax.data.sources"):
    docs = open_source(f"text:{d}/c.txt", decode_errors="replace")
  assert len(docs) == 0 and "skipped 1 binary file(s)" in caplog.text


def test_undecodable_jsonl_line_names_file_and_offset(tmp_path):
  from engram_jax.data.sources import open_source

  path = tmp_path / "x.jsonl"
  path.write_bytes(b'{"text": "a"}\n{"text": "b\xc3"}\n')
  with pytest.raises(ValueError, match=r"x\.jsonl: not valid utf-8 at byte offset 25"):
    open_source(f"jsonl:{path}")
  assert len(open_source(f"jsonl:{path}", decode_errors="skip")) == 0
  docs = open_source(f"jsonl:{path}", decode_errors="replace")
  assert [docs.read(i) for i in range(len(docs))] == ["a", "b\ufffd"]


def test_stdlib_corpus_decodes_every_file_faithfully():
  """The built-in corpus holds two PEP 263 files in other encodings (decoded with their
  declaration) and one deliberately invalid file (skipped): no U+FFFD is trained on."""
  from engram_jax.data.sources import open_source

  docs = open_source("stdlib")
  assert "test/badsyntax_pep3120.py" not in docs.keys
  koi8 = docs.keys.index("test/encoded_modules/module_koi8_r.py")
  assert "\u041f\u043e\u0437\u043d\u0430\u043d\u0438\u0435" in docs.read(koi8)  # "Познание"
  # strict decoding (a bad byte would raise): every document reads without a replacement
  assert docs.errors == "strict" and all(isinstance(docs.read(i), str) for i in range(len(docs)))


# ------------------------------------------------------------------ defect 8: tokenizer files
def _bad_tokenizer_files(tmp_path):
  from engram_jax.data.tokenizer import train_bpe_tokenizer

  good = train_bpe_tokenizer(["hello world " * 20, "tokenizer files"], 300).to_str()
  cases = {
    "truncated": (
      good[: len(good) // 2],
      r"is not valid JSON \(.* line 1 column \d+; the file has \d+ bytes: "
      r"truncated or corrupt\?\)",
    ),
    "not_tokenizer": (
      '{"hello": 1}',
      r"is JSON but not a tokenizers tokenizer.json: no 'model' entry "
      r"\(found \['hello'\]\)",
    ),
    "list": ("[1, 2]", r"is JSON but not a tokenizers tokenizer.json: no 'model' entry \(found a JSON list\)"),
    "empty": ("", "is empty"),
    "bad_model": ('{"model": {"type": "Nope"}}', "is not a valid tokenizer.json: "),
  }
  out = {}
  for name, (text, message) in cases.items():
    path = tmp_path / f"{name}.json"
    path.write_text(text)
    out[name] = (path, message)
  binary = tmp_path / "binary.json"
  binary.write_bytes(b"\xff\xfe\x00{")
  out["binary"] = (binary, r"is not a tokenizer.json: not UTF-8 text \(byte offset 0\)")
  return out


def test_bad_tokenizer_file_named_with_its_problem(tmp_path):
  """Defect 8: a bare `Exception` naming neither file nor problem (and valid JSON that is
  not a tokenizer reported as a JSON syntax error)."""
  from engram_jax.data import DataConfig
  from engram_jax.data.tokenizer import load_or_train_tokenizer
  from engram_jax.hashing import TokenizerCompressor

  for path, message in _bad_tokenizer_files(tmp_path).values():
    with pytest.raises(ValueError, match=rf"DataConfig.tokenizer_path {path} {message}"):
      load_or_train_tokenizer(DataConfig(tokenizer_path=str(path)))
    with pytest.raises(ValueError, match=rf"tokenizer file {path} {message}"):
      TokenizerCompressor.from_file(path)
  with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
    TokenizerCompressor.from_file(tmp_path / "missing.json")


def test_corrupt_cached_tokenizer_is_named(tmp_path):
  from engram_jax.data import DataConfig
  from engram_jax.data.tokenizer import TOKENIZER_FILE, load_or_train_tokenizer

  (tmp_path / TOKENIZER_FILE).write_text('{"version": "1.0", "trunc')
  with pytest.raises(ValueError, match=r"cached tokenizer \(delete it to retrain\) .*tokenizer.json is not valid JSON"):
    load_or_train_tokenizer(DataConfig(tokenizer_dir=str(tmp_path)))


# ------------------------------------------------------------------ config validation
def _model(**kw):
  from engram_jax.models import ModelConfig

  return ModelConfig.tiny("engram_moe", **kw)


@pytest.mark.parametrize(
  "build, message",
  [
    (lambda: EngramConfig(vocab_sizes=(100.7, 200)), r"EngramConfig.vocab_sizes\[0\] must be an int, got 100.7"),
    (lambda: EngramConfig(vocab_sizes="100"), "EngramConfig.vocab_sizes must be a sequence of ints, got '100'"),
    (lambda: EngramConfig(layer_ids=("1",)), r"EngramConfig.layer_ids\[0\] must be an int, got '1'"),
    (lambda: EngramConfig(seed=-1), "EngramConfig.seed must be an int >= 0, got -1"),
    (lambda: EngramConfig(pad_id=1.5), "EngramConfig.pad_id must be an int >= 0, got 1.5"),
    (lambda: EngramConfig(n_embed_per_ngram="512"), "EngramConfig.n_embed_per_ngram must be an int >= 1, got '512'"),
    (lambda: EngramConfig(allow_layer_zero=1), "EngramConfig.allow_layer_zero must be True or False, got 1"),
    (lambda: _moe(routed_scaling=float("nan")), r"MoEConfig.routed_scaling must be a finite number > 0.0, got nan"),
    (lambda: _moe(capacity_factor="1.25"), "MoEConfig.capacity_factor must be a finite number > 0.0, got '1.25'"),
    (lambda: _moe(bias_update_rate=-1e-3), "MoEConfig.bias_update_rate must be a finite number >= 0.0, got -0.001"),
    (lambda: _moe(top_k=True), "MoEConfig.top_k must be an int >= 1, got True"),
    (lambda: _model(rope_theta=0.0), r"ModelConfig.rope_theta must be a finite number > 0.0, got 0.0"),
    (lambda: _model(norm_eps="1e-6"), "ModelConfig.norm_eps must be a finite number > 0.0, got '1e-6'"),
    (lambda: _model(tie_embeddings="no"), "ModelConfig.tie_embeddings must be True or False, got 'no'"),
    (
      lambda: _model(engram_compressed_vocab=2.5),
      "ModelConfig.engram_compressed_vocab must be None or an int >= 1, got 2.5",
    ),
  ],
)
def test_library_configs_name_field_value_and_range(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def _moe(**kw):
  from engram_jax.layers.moe import MoEConfig

  return MoEConfig(**{**dict(num_experts=8, num_shared_experts=1, top_k=2, expert_hidden=16), **kw})


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("variant", "engarm", r"config.variant must be one of \('dense', 'moe', 'engram'\), got 'engarm'"),
    ("allocation.rho", 1.5, r"config.allocation.rho must be a finite number in \[0.0, 1.0\], got 1.5"),
    ("allocation.active_rtol", -0.1, "config.allocation.active_rtol must be a finite number >= 0.0, got -0.1"),
    ("mesh.tensor", 0, "config.mesh.tensor must be an int >= 1, got 0"),
    ("mesh.data", 0, r"config.mesh.data must be -1 \(every device the other axes leave\) or an int >= 1, got 0"),
    ("seed", -2, "config.seed must be an int >= 0, got -2"),
    ("engram.compress_tokens", "yes", "config.engram.compress_tokens must be True or False, got 'yes'"),
  ],
)
def test_experiment_config_fields_are_validated(field, value, message):
  from experiments.configs import common, tiny

  c = tiny.get_config("engram")
  block, _, name = field.rpartition(".")
  target = c[block] if block else c
  with target.ignore_type():
    target[name] = value
  with pytest.raises(ValueError, match=message):
    common.model_config(c)
  with pytest.raises(ValueError, match=message):
    common.mesh_axes(c, 8)


@pytest.mark.parametrize(
  "changes, message",
  [
    (dict(seed=True), r"DataConfig.seed must be an int in \[0, 4294967295\], got True"),
    (dict(max_documents=True), "DataConfig.max_documents must be None or an int >= 1, got True"),
    (dict(tokenizer_path=""), "DataConfig.tokenizer_path must be None or a non-empty path string, got ''"),
    (dict(stdlib_include_tests="no"), "DataConfig.stdlib_include_tests must be True or False, got 'no'"),
    (dict(validation_fraction="0.1"), r"DataConfig.validation_fraction must be a number in \[0, 1\), got '0.1'"),
  ],
)
def test_data_config_names_field_value_and_range(changes, message):
  from engram_jax.data import DataConfig

  with pytest.raises(ValueError, match=message):
    DataConfig(**changes)


def test_undecodable_arrayrecord_record_names_file_and_record(tmp_path):
  from array_record.python import array_record_module

  from engram_jax.data.sources import open_source

  path = tmp_path / "a.array_record"
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for r in (b"fine", b"bad \xff byte"):
    writer.write(r)
  writer.close()
  docs = open_source(f"arrayrecord:{path}")
  assert docs.read(0) == "fine"
  with pytest.raises(ValueError, match=r"a\.array_record record 1: not valid utf-8 at byte offset 4"):
    docs.read(1)
  assert len(open_source(f"arrayrecord:{path}", decode_errors="skip")) == 0
  assert open_source(f"arrayrecord:{path}", decode_errors="replace").read(1) == "bad \ufffd byte"

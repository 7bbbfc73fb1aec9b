"""The default validation set: line-aligned chunks drawn round-robin from every document.

Packing the validation documents in a fixed order and keeping the first batches (the
"packed" set) scores one or two files. This set instead:
  1. tokenizes every validation document (+ <eos>) and cuts it into chunks of up to
     seq_len + 1 tokens, each starting at the beginning of a line (a chunk starts at the
     first line start at or after the previous chunk's end; a few tokens between are
     skipped);
  2. orders the chunks round-robin over the documents: the documents in a fixed shuffled
     order (`eval_seed`), each document's chunks shuffled; round r takes the r-th chunk of
     every document that still has one. Any prefix of this order covers as many documents
     as it can: every document is in the set once it holds more rows than there are
     documents;
  3. keeps the shortest prefix with at least `eval_tokens` scored tokens (all chunks if
     None), shuffles those rows (fixed) and batches them, `eval_rows` per batch; the last
     batch is padded with empty rows (loss_mask 0). `num_eval_batches` caps the batches.
Each row is one chunk: segment 1, positions from 0, like a training row's first segment.
The set depends only on the validation documents, the tokenizer, seq_len, eval_tokens,
eval_seed and eval_rows, never on the data seed: every model is scored on the same tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

from engram_jax.data.config import DataConfig
from engram_jax.data.packing import has_text, row_to_example
from engram_jax.data.sources import Corpus
from engram_jax.data.tokenizer import special_ids, token_byte_lengths


@dataclasses.dataclass(frozen=True)
class EvalRows:
  """The selected chunks, in batch order (N rows, W = seq_len + 1).

  ids: int32 [N, W] (pad after `lengths`); lengths: int32 [N]; doc_index: int32 [N], the
  chunk's document in the validation corpus; start: int32 [N], its first token's index
  in that document; num_documents: documents in the validation corpus (with text).
  """

  ids: np.ndarray
  lengths: np.ndarray
  doc_index: np.ndarray
  start: np.ndarray
  num_documents: int

  @property
  def scored_tokens(self) -> int:
    return int(np.sum(np.maximum(self.lengths - 1, 0)))


def _line_start_tokens(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
  """Indices of the tokens that begin a line: the first one, those right after a newline
  and those whose text begins with one."""
  starts = []
  for i, (s, _) in enumerate(offsets):
    if i == 0 or (s > 0 and text[s - 1] == "\n") or text[s : s + 1] == "\n":
      starts.append(i)
  return np.asarray(starts, np.int64)


def document_chunks(ids: np.ndarray, line_starts: np.ndarray, width: int) -> list[int]:
  """Start indices of the line-aligned chunks of one document of len(ids) tokens."""
  out, pos = [], 0
  n = len(ids)
  while pos < n - 1:  # a chunk needs 2 tokens for one target
    out.append(pos)
    nxt = np.searchsorted(line_starts, pos + width)
    if nxt >= len(line_starts):
      break
    pos = int(line_starts[nxt])
  return out


# The selections made in this process, newest last: {key: EvalRows}. Tokenizing the whole
# validation corpus dominates a selection, and a process that trains or evaluates several
# models on the same data (a sweep, `experiments.memory_scaling`, the tests) asks for the
# same one each time. The key holds every input of the selection, so a hit is exact.
_SELECTIONS: collections.OrderedDict[tuple, EvalRows] = collections.OrderedDict()
_MAX_SELECTIONS = 4


def _selection_key(texts: list[str], tokenizer, config: DataConfig) -> tuple:
  digest = hashlib.sha256(tokenizer.to_str().encode("utf-8"))
  for text in texts:
    digest.update(len(text).to_bytes(8, "little"))
    digest.update(text.encode("utf-8", "surrogatepass"))
  return digest.hexdigest(), config.seq_len, config.eval_seed, config.eval_tokens


def select_eval_rows(corpus: Corpus, tokenizer, config: DataConfig) -> EvalRows:
  """Steps 1-3 of the module docstring (before batching).

  The result depends only on the validation texts, the tokenizer, `seq_len`, `eval_seed`
  and `eval_tokens`; a process keeps its last few selections keyed by exactly these and
  returns a kept one (its arrays read-only) instead of tokenizing the corpus again.
  """
  texts = [corpus[d] for d in range(len(corpus))]
  key = _selection_key(texts, tokenizer, config)
  if key in _SELECTIONS:
    _SELECTIONS.move_to_end(key)
    return _SELECTIONS[key]
  rows = _select_eval_rows(texts, tokenizer, config)
  for array in (rows.ids, rows.lengths, rows.doc_index, rows.start):
    array.setflags(write=False)
  _SELECTIONS[key] = rows
  while len(_SELECTIONS) > _MAX_SELECTIONS:
    _SELECTIONS.popitem(last=False)
  return rows


def _select_eval_rows(texts: list[str], tokenizer, config: DataConfig) -> EvalRows:
  width = config.seq_len + 1
  eos, pad = special_ids(tokenizer).eos, special_ids(tokenizer).pad
  docs: list[np.ndarray] = []
  chunks: list[list[int]] = []
  doc_ids: list[int] = []
  for d, text in enumerate(texts):
    if not has_text(text):
      continue
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(list(enc.ids) + [eos], np.int32)
    starts = _line_start_tokens(text, enc.offsets)
    docs.append(ids)
    chunks.append(document_chunks(ids, starts, width))
    doc_ids.append(d)
  if not docs:
    raise ValueError("the validation corpus has no document with text")
  rng = np.random.default_rng(config.eval_seed)
  order = rng.permutation(len(docs))
  per_doc = [list(rng.permutation(c)) if c else [] for c in chunks]
  picked: list[tuple[int, int]] = []  # (doc position, start)
  budget = config.eval_tokens
  scored = 0
  rnd = 0
  while budget is None or scored < budget:
    took = False
    for j in order:
      if rnd < len(per_doc[j]):
        start = int(per_doc[j][rnd])
        picked.append((int(j), start))
        scored += min(width, len(docs[j]) - start) - 1
        took = True
        if budget is not None and scored >= budget:
          break
    if not took:
      break
    rnd += 1
  rows = [picked[i] for i in rng.permutation(len(picked))]
  n = len(rows)
  ids = np.full((n, width), pad, np.int32)
  lengths = np.zeros(n, np.int32)
  for r, (j, start) in enumerate(rows):
    piece = docs[j][start : start + width]
    ids[r, : len(piece)] = piece
    lengths[r] = len(piece)
  return EvalRows(
    ids,
    lengths,
    np.asarray([doc_ids[j] for j, _ in rows], np.int32),
    np.asarray([s for _, s in rows], np.int32),
    len(docs),
  )


def chunk_eval_batches(corpus: Corpus, tokenizer, config: DataConfig, row_hasher) -> list[dict]:
  """The batches of the "chunks" validation set, Engram rows hashed by `row_hasher`."""
  sel = select_eval_rows(corpus, tokenizer, config)
  b = config.eval_rows
  byte_lengths = token_byte_lengths(tokenizer)
  pad = special_ids(tokenizer).pad
  width = sel.ids.shape[1]
  col = np.arange(width, dtype=np.int32)
  batches = []
  for lo in range(0, len(sel.lengths), b):
    ids = np.full((b, width), pad, np.int32)
    lengths = np.zeros(b, np.int32)
    part = slice(lo, min(lo + b, len(sel.lengths)))
    k = part.stop - part.start
    ids[:k], lengths[:k] = sel.ids[part], sel.lengths[part]
    valid = col[None, :] < lengths[:, None]
    seg = valid.astype(np.int32)
    pos = np.where(valid, col[None, :], 0).astype(np.int32)
    batches.append(row_hasher(row_to_example(ids, seg, pos, pad, byte_lengths)))
    if config.num_eval_batches is not None and len(batches) == config.num_eval_batches:
      break
  return batches

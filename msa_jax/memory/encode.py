"""Streaming corpus -> bank encoding (stage 1): pack, encode in fixed-shape batches, commit.

Documents are wrapped and tokenized as training samples are (`transcript.document_ids`, in the
layout the model's `MSAConfig.align_doc_id` says), and packed whole, in corpus order, into rows of
`row_tokens` (at most `max_docs_per_row` per row); `batch_rows` rows form a `MemoryBatch` of one
static shape, so the jitted `entry_points.encode_memory` compiles once. Each row's pooled chunk
slots are taken in slot order (`chunk_doc` says which document owns each slot), which is bank
order, and committed with the documents' ids and texts (`BankWriter`). The next batch is
dispatched before the previous one is pulled to the host and written, so packing and disk writes
overlap the device.

Resume and append. A fresh encode into a new directory creates the bank at its first commit. If
it is killed, running the same call again resumes: the bank's session records where the call's
documents start, a digest of those it committed and the packing settings; the corpus's first
documents must match that digest, and encoding continues after the last committed one (packing
restarts at a batch boundary, so the result is byte-identical to an uninterrupted run).
`append=True` adds the given documents to a finished bank (old documents are never re-encoded);
a killed append resumes the same way with `append=True`. The whole call holds the bank's write lock
(`BankLock`), so a second writer is refused, naming the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

from msa_jax.data import prompt_format as pf
from msa_jax.data.batch_builder import build_memory_batch
from msa_jax.data.transcript import document_ids
from msa_jax.formatting import format_duration
from msa_jax.memory import manifest as mf
from msa_jax.memory import store
from msa_jax.memory.bank import check_model
from msa_jax.memory.corpus import Document
from msa_jax.memory.errors import BankError
from msa_jax.memory.lock import BankLock
from msa_jax.memory.writer import (DEFAULT_ROWS_PER_CHUNK, BankWriter, EncodedBatch,
                                   remove_stale_temps)
from msa_jax.model import entry_points, router_keys

_EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
# Only the view: a bank does not keep the template head's K/V (serving prefills the template head),
# so the compiled program leaves it out.
_encode_view = jax.jit(lambda model, params, memory, template: entry_points.encode_memory(
    model, params, memory, template).view, static_argnums=0)
_quantize = jax.jit(router_keys.quantize, static_argnums=1)


@dataclasses.dataclass
class EncodeStats:
  """What one `encode_corpus` call did. `tokens`: wrapped-document tokens encoded (no padding);
  `slot_tokens`: row slots the device processed (batches x batch_rows x row_tokens); the first
  batch's time includes compilation, so steady-state throughput leaves it out."""

  path: str
  documents: int
  tokens: int
  chunks: int
  batches: int
  slot_tokens: int
  seconds: float
  first_batch_seconds: float
  first_batch_tokens: int
  resumed_documents: int
  bank_documents: int

  @property
  def tokens_per_second(self) -> float:
    return self.tokens / self.seconds if self.seconds > 0 else 0.0

  @property
  def steady_tokens_per_second(self) -> float:
    """Throughput after the first batch (compilation excluded); 0 with a single batch."""
    seconds = self.seconds - self.first_batch_seconds
    return (self.tokens - self.first_batch_tokens) / seconds if self.batches > 1 else 0.0

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out["tokens_per_second"] = self.tokens_per_second
    out["steady_tokens_per_second"] = self.steady_tokens_per_second
    return out


@dataclasses.dataclass(frozen=True)
class _Tokenized:
  display_id: int
  text: str
  tokens: np.ndarray


def _chain(digest: str, display_id: int, text: str) -> str:
  """The session digest after one more document."""
  h = hashlib.sha256(digest.encode())
  h.update(f"|{display_id}|".encode())
  h.update(text.encode("utf-8"))
  return h.hexdigest()


def _as_document(item, where: str) -> Document:
  if isinstance(item, Document):
    return item
  if isinstance(item, str):
    return Document(item)
  raise BankError(f"{where}: expected a Document or a string, got {type(item).__name__}")


class _Progress:
  """A progress line every `every_s` seconds: documents done, tokens/s, ETA. `resumed` documents
  were committed by an earlier run; rates count this run's work only."""

  def __init__(self, path: str, total: int | None, resumed: int, every_s: float,
               log: Callable[[str], None]):
    self.path, self.total, self.resumed, self.every_s, self.log = path, total, resumed, every_s, log
    self.start = time.perf_counter()
    self.last = self.start

  def update(self, documents: int, tokens: int, final: bool = False) -> None:
    """`documents`, `tokens`: encoded by this run so far."""
    now = time.perf_counter()
    if not final and now - self.last < self.every_s:
      return
    self.last = now
    elapsed = max(now - self.start, 1e-9)
    done = self.resumed + documents
    line = f"encode {self.path}: {done:,}"
    if self.total is not None:
      eta = (self.total - done) * elapsed / documents if documents else float("inf")
      line += f"/{self.total:,} documents ({100 * done / max(self.total, 1):.1f}%), "
      line += f"{tokens / elapsed:,.0f} tokens/s, ETA {format_duration(eta)}"
    else:
      line += f" documents, {tokens / elapsed:,.0f} tokens/s"
    self.log(line + (" (done)" if final else ""))


@dataclasses.dataclass(frozen=True)
class _Packing:
  row_tokens: int
  batch_rows: int
  max_docs_per_row: int
  chunk_size: int
  max_positions: int
  vocab_size: int
  pad_id: int
  align_to: int


class _Encoder:
  """One `encode_corpus` call: the target bank's state and the per-batch work."""

  def __init__(self, model, params, tokenizer, out_dir: str, packing: _Packing, append: bool,
               rows_per_chunk: int, key_dtype: str | None, lock: BankLock):
    self.model, self.params, self.tokenizer, self.lock = model, params, tokenizer, lock
    self.path = os.path.abspath(out_dir)
    self.packing = packing
    self.rows_per_chunk = rows_per_chunk
    self.template = np.asarray(tokenizer.encode(pf.TEMPLATE_HEAD), np.int32)
    if self.template.size != model.msa.template_len:
      raise BankError(f"the tokenizer encodes the template head {pf.TEMPLATE_HEAD!r} as "
                      f"{self.template.size} tokens, but the model's template_len is "
                      f"{model.msa.template_len}")
    self.params_fingerprint = mf.params_fingerprint(params)
    self.writer: BankWriter | None = None
    self.session: mf.EncodingSession | None = None
    self.used_ids: set[int] = set()
    self.key_dtype = key_dtype or router_keys.DEFAULT_KEY_DTYPE
    self._open(append)
    if key_dtype is not None and key_dtype != self.key_dtype:
      raise BankError(f"bank {self.path} stores router keys in {self.key_dtype}, not the requested "
                      f"{key_dtype}; a bank has one key dtype (convert it with "
                      f"tools/convert_bank.py)")

  def _session(self, start_doc: int) -> mf.EncodingSession:
    p = self.packing
    return mf.EncodingSession(start_doc=start_doc, digest=_EMPTY_DIGEST, row_tokens=p.row_tokens,
                              batch_rows=p.batch_rows, max_docs_per_row=p.max_docs_per_row)

  def _open(self, append: bool) -> None:
    """Decides between a new bank, a resume and an append, refusing what does not fit."""
    for tmp in remove_stale_temps(self.path, self.lock):
      self.lock.log(f"removed {tmp}, left by an encode killed before its first commit")
    if not os.path.lexists(self.path) or _is_empty_dir(self.path):
      if append:
        raise BankError(f"no bank at {self.path} to append to")
      self.session = self._session(0)
      return
    if not os.path.isdir(self.path):
      raise BankError(f"{self.path} is a file, not a bank directory; choose another output "
                      f"directory")
    if not os.path.exists(mf.manifest_path(self.path)):
      raise BankError(f"{self.path} is a directory but not a bank (it has no {mf.MANIFEST_FILE}); "
                      f"choose a new or empty output directory")
    manifest = mf.read_manifest(self.path)
    check_model(self.path, manifest, self.model.config, self.model.msa, self.params)
    self.key_dtype = manifest.router_key_dtype
    session = manifest.encoding
    if session is None:
      if not append:
        raise BankError(f"a finished bank already exists at {self.path}; pass append=True "
                        f"(--append) to add documents, or choose another output directory")
      self.writer = BankWriter(self.path, manifest, self.lock)
      self.session = self._session(manifest.num_docs)
    else:
      if append != (session.start_doc > 0):
        how = "with --append (append=True)" if session.start_doc > 0 else "without --append"
        what = "append" if session.start_doc > 0 else "encode"
        raise BankError(f"bank {self.path} holds an interrupted {what}; resume it by running the "
                        f"same {what} again, {how} and with the same corpus")
      p = self.packing
      ours = (p.row_tokens, p.batch_rows, p.max_docs_per_row)
      theirs = (session.row_tokens, session.batch_rows, session.max_docs_per_row)
      if ours != theirs:
        raise BankError(f"bank {self.path}: the interrupted encode packed (row_tokens, "
                        f"batch_rows, max_docs_per_row) = {theirs}; resume with the same "
                        f"settings, not {ours}")
      self.writer = BankWriter(self.path, manifest, self.lock)
      self.session = session
    self.used_ids = set(self.writer.display_ids().tolist())

  @property
  def bank_docs(self) -> int:
    return 0 if self.writer is None else self.writer.manifest.num_docs

  def skip_committed(self, documents: Iterator) -> int:
    """Consumes the documents this session already committed, checking they are the same."""
    done = self.bank_docs - self.session.start_doc
    digest = _EMPTY_DIGEST
    for i in range(done):
      item = next(documents, None)
      if item is None:
        raise BankError(f"bank {self.path}: the interrupted encode committed {done} documents of "
                        f"its corpus, but this corpus has only {i}; resume with the same corpus")
      doc = _as_document(item, f"document {i}")
      digest = _chain(digest, self._display_id(doc, self.session.start_doc + i), doc.text)
    if digest != self.session.digest:
      raise BankError(f"bank {self.path}: the first {done} documents of this corpus differ from "
                      f"those the interrupted encode committed; resume with the same corpus")
    return done

  @staticmethod
  def _display_id(doc: Document, row: int) -> int:
    return row if doc.display_id is None else int(doc.display_id)

  def tokenized(self, documents: Iterator, first_row: int) -> Iterator[_Tokenized]:
    """Wrapped, tokenized, validated documents; errors name the document."""
    p = self.packing
    for row, item in enumerate(documents, start=first_row):
      where = f"document {row - self.session.start_doc} of the corpus (bank row {row})"
      doc = _as_document(item, where)
      display_id = self._display_id(doc, row)
      if display_id < 0:
        raise BankError(f"{where}: display id {display_id} is negative")
      if display_id in self.used_ids:
        raise BankError(f"{where}: display id {display_id} is already used by another document "
                        f"of the bank; display ids must be unique")
      self.used_ids.add(display_id)
      tokens = np.asarray(document_ids(self.tokenizer, display_id, doc.text, p.align_to),
                          np.int32)
      limit = min(p.row_tokens, p.max_positions)
      if tokens.size > limit:
        what = (f"a row (row_tokens={p.row_tokens})" if p.row_tokens <= p.max_positions else
                f"the model's limit (max_position_embeddings={p.max_positions})")
        raise BankError(f"{where}: {tokens.size} tokens once wrapped, longer than {what}; "
                        f"documents are never split, so split it or raise row_tokens")
      if tokens.size and tokens.max() >= p.vocab_size:
        raise BankError(f"{where}: token id {int(tokens.max())} is outside the model's vocabulary "
                        f"({p.vocab_size}); is this the model's tokenizer?")
      yield _Tokenized(display_id, doc.text, tokens)

  def batches(self, docs: Iterator[_Tokenized]) -> Iterator[list[list[_Tokenized]]]:
    """Greedy packing in corpus order: a row takes documents while they fit."""
    p = self.packing
    rows, row, used = [], [], 0
    for doc in docs:
      if row and (used + doc.tokens.size > p.row_tokens or len(row) == p.max_docs_per_row):
        rows.append(row)
        row, used = [], 0
        if len(rows) == p.batch_rows:
          yield rows
          rows = []
      row.append(doc)
      used += doc.tokens.size
    if row:
      rows.append(row)
    if rows:
      yield rows

  def dispatch(self, rows: list[list[_Tokenized]]):
    """Builds the batch and starts encoding it on the device (asynchronously)."""
    p = self.packing
    memory = build_memory_batch([[d.tokens for d in row] for row in rows],
                                batch_rows=p.batch_rows, seq_len_mem=p.row_tokens,
                                max_docs=p.max_docs_per_row, chunk_size=p.chunk_size,
                                pad_id=p.pad_id, vocab_size=p.vocab_size)
    return memory, _encode_view(self.model, self.params, memory, self.template)

  def commit(self, rows: list[list[_Tokenized]], memory, view) -> tuple[int, int]:
    """Pulls the batch's pooled slots to the host and commits its documents: (chunks, tokens)."""
    p = self.packing
    docs = [d for row in rows for d in row]
    doc_chunks = np.array([-(-d.tokens.size // p.chunk_size) for d in docs], np.int64)
    chunk_doc = np.asarray(memory.chunk_doc)
    owned = np.concatenate([np.bincount(chunk_doc[b], minlength=len(row) + 1)[1:len(row) + 1]
                            for b, row in enumerate(rows)])
    if not np.array_equal(owned, doc_chunks):
      raise BankError(f"internal error: chunk slots per document {owned.tolist()} differ from the "
                      f"expected {doc_chunks.tolist()}")
    valid = chunk_doc > 0
    layers = view.layers
    keys, scales = _quantize(layers.k_r, self.key_dtype)
    keys, k, v, scales = jax.device_get((keys, layers.k, layers.v, scales))
    pick = lambda x: None if x is None else np.ascontiguousarray(x[:, valid])
    batch = EncodedBatch(pick(keys), pick(k), pick(v), doc_chunks,
                         np.array([d.display_id for d in docs], np.int64), [d.text for d in docs],
                         pick(scales))
    digest = self.session.digest
    for d in docs:
      digest = _chain(digest, d.display_id, d.text)
    if self.writer is None:
      self.writer = BankWriter.create(self.path, self._new_manifest(batch), batch, digest,
                                      self.lock)
      self.session = self.writer.manifest.encoding
    else:
      self.writer.commit(batch, digest)
    return int(doc_chunks.sum()), int(sum(d.tokens.size for d in docs))

  def _new_manifest(self, batch: EncodedBatch) -> mf.BankManifest:
    model_cfg, msa_cfg = self.model.config, self.model.msa
    dtypes = {"router_keys": batch.router_keys.dtype, "content_k": batch.content_k.dtype,
              "content_v": batch.content_v.dtype, "doc_chunk_offsets": np.int64,
              "display_ids": np.int64, "text_offsets": np.int64, "text": np.uint8}
    if batch.router_key_scales is not None:
      dtypes[store.KEY_SCALES] = batch.router_key_scales.dtype
    stamp = mf.now()
    return mf.BankManifest(
        format_version=mf.FORMAT_VERSION,
        config_fingerprint=mf.config_fingerprint(model_cfg, msa_cfg),
        params_fingerprint=self.params_fingerprint,
        model_config=dataclasses.asdict(model_cfg),
        msa_config={**dataclasses.asdict(msa_cfg), "router_layers": list(msa_cfg.router_layers)},
        chunk_size=msa_cfg.chunk_size, router_layers=msa_cfg.router_layers, num_docs=0,
        num_chunks=0, text_bytes=0, dtypes={k: np.dtype(v).name for k, v in dtypes.items()},
        score_mode=msa_cfg.score_mode, rows_per_chunk=self.rows_per_chunk, checksums={},
        encoding=self.session, created=stamp, updated=stamp)


def _is_empty_dir(path: str) -> bool:
  return os.path.isdir(path) and not os.listdir(path)


def encode_corpus(model, params, tokenizer, documents: Iterable[Document | str], out_dir: str, *,
                  batch_rows: int = 8, row_tokens: int = 4096,
                  max_docs_per_row: int | None = None, append: bool = False,
                  rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK, router_key_dtype: str | None = None,
                  progress_every_s: float = 10.0,
                  log: Callable[[str], None] = print,
                  on_commit: Callable[[EncodeStats], None] | None = None) -> EncodeStats:
  """Encodes `documents` (Documents or strings, in order) into the bank at `out_dir`.

  A new directory becomes a new bank; an interrupted one is resumed; `append=True` adds the
  documents to a finished bank (see the module doc). `max_docs_per_row` defaults to
  row_tokens // P. `router_key_dtype` (`router_keys.KEY_DTYPES`): how a new bank stores its router
  keys (default bfloat16); a resume or append keeps the bank's. `on_commit(stats)` runs after every
  committed batch (an exception there stops the encode with that batch committed). Raises
  `BankError` for bad input, a foreign bank, a mismatched resume or a bank another writer holds;
  documents committed before an error stay committed and resumable.
  """
  for name, value in (("batch_rows", batch_rows), ("row_tokens", row_tokens),
                      ("rows_per_chunk", rows_per_chunk)):
    if value <= 0:
      raise BankError(f"{name} must be positive, got {value}")
  if router_key_dtype is not None and router_key_dtype not in router_keys.KEY_DTYPES:
    raise BankError(f"router_key_dtype must be one of {router_keys.KEY_DTYPES}, got "
                    f"{router_key_dtype!r}")
  msa = model.msa
  if not msa.router_layers:
    raise BankError("the model has no router layers, so a bank would hold nothing")
  max_docs = max_docs_per_row or max(1, row_tokens // msa.chunk_size)
  packing = _Packing(row_tokens=row_tokens, batch_rows=batch_rows, max_docs_per_row=max_docs,
                     chunk_size=msa.chunk_size, max_positions=model.config.max_position_embeddings,
                     vocab_size=model.config.vocab_size, pad_id=tokenizer.pad_id,
                     align_to=msa.doc_align_to)
  with BankLock(out_dir, log) as lock:
    enc = _Encoder(model, params, tokenizer, out_dir, packing, append, rows_per_chunk,
                   router_key_dtype, lock)
    return _run(enc, documents, progress_every_s, log, on_commit)


def _run(enc: _Encoder, documents: Iterable[Document | str], progress_every_s: float,
         log: Callable[[str], None],
         on_commit: Callable[[EncodeStats], None] | None) -> EncodeStats:
  """The body of `encode_corpus`, under the bank's lock."""
  start = time.perf_counter()  # encoding time: after the parameter fingerprint and bank checks
  total = len(documents) if hasattr(documents, "__len__") else None
  stream = iter(documents)
  resumed = enc.skip_committed(stream)
  batches = enc.batches(enc.tokenized(stream, enc.bank_docs))
  stats = EncodeStats(path=enc.path, documents=0, tokens=0, chunks=0, batches=0, slot_tokens=0,
                      seconds=0.0, first_batch_seconds=0.0, first_batch_tokens=0,
                      resumed_documents=resumed, bank_documents=enc.bank_docs)
  progress = _Progress(enc.path, total, resumed, progress_every_s, log)
  first = next(batches, None)
  if first is None and not resumed:
    raise BankError("the corpus has no documents to encode")
  if enc.writer is not None and enc.writer.manifest.encoding is None:
    enc.writer.start_session(enc.session)

  def commit(pending) -> None:
    rows, memory, view = pending
    chunks, tokens = enc.commit(rows, memory, view)
    stats.documents += sum(len(r) for r in rows)
    stats.tokens += tokens
    stats.chunks += chunks
    stats.batches += 1
    stats.slot_tokens += enc.packing.batch_rows * enc.packing.row_tokens
    stats.seconds = time.perf_counter() - start
    stats.bank_documents = enc.bank_docs
    if stats.batches == 1:
      stats.first_batch_seconds, stats.first_batch_tokens = stats.seconds, tokens
    progress.update(stats.documents, stats.tokens)
    if on_commit is not None:
      on_commit(stats)

  pending = None if first is None else (first, *enc.dispatch(first))
  while pending is not None:
    try:
      rows = next(batches, None)
      following = None if rows is None else (rows, *enc.dispatch(rows))
    except BaseException:
      commit(pending)  # what was encoded before the bad document is kept
      raise
    commit(pending)
    pending = following
  enc.writer.finish()
  stats.seconds = time.perf_counter() - start
  stats.bank_documents = enc.bank_docs
  progress.update(stats.documents, stats.tokens, final=True)
  return stats

"""Bank encode/store: encode -> reopen equals encoding each document alone; kill + resume is
byte-identical to one run; append equals encoding everything at once; int8 router keys carry their
scales; format-2 and format-3 banks are refused and convert (a converted format-3 bank is the one
a current encode writes); foreign, corrupt, truncated and missing banks and
bad corpora fail with clear errors and lose nothing."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import config as cfglib
from msa_jax.data import prompt_format as pf
from msa_jax.data.batch_builder import build_memory_batch
from msa_jax.data.records import make_record
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.data.transcript import record_step_sample
from msa_jax.memory import BankError, open_bank
from msa_jax.memory import manifest as mf
from msa_jax.memory import store
from msa_jax.memory.convert import convert_bank
from msa_jax.memory.corpus import Document
from msa_jax.memory.encode import encode_corpus
from msa_jax.model import entry_points, router_keys
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training.model_setup import dummy_batch
from tests.binary_runner import run_python

ROW_TOKENS, BATCH_ROWS = 128, 2
ROWS_PER_CHUNK = 16  # storage chunks much smaller than the bank: batches end inside chunks
ROOT = os.path.join(os.path.dirname(__file__), "..")
TOKENIZER = os.path.join(ROOT, "models", "tiny_msa", "tokenizer.json")
WORDS = "alpha beta gamma delta river stone cloud fire water moon".split()
# very different lengths: from an empty text to one that nearly fills a row
WORD_COUNTS = [0, 60, 3, 110, 1, 25, 40, 7, 90, 14, 2, 33]


FORMAT_4_ARRAYS = ("router_keys", "content_k", "content_v", "doc_chunk_offsets", "display_ids",
                   "text_offsets", "text")


def _texts(counts, seed=0):
  rng = np.random.default_rng(seed)
  texts = [" ".join(rng.choice(WORDS, n)) for n in counts]
  texts[2] += " café ☃"  # multi-byte UTF-8 in the text store
  return texts


@pytest.fixture(scope="module")
def setup():
  model_cfg, msa_cfg = cfglib.preset("tiny")
  model_cfg = model_cfg.replace(vocab_size=832, compute_dtype="float32")
  msa_cfg = msa_cfg.replace(router_layers=(1, 3))  # non-consecutive: r indexes router layers
  model = MSAForCausalLM(model_cfg, msa_cfg)
  memory, prompt = dummy_batch(model_cfg, msa_cfg)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), prompt, memory)["params"])
  rng = np.random.default_rng(0)  # random weights without compiling init
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  return model, params, Tokenizer.from_file(TOKENIZER)


def _encode(setup, docs, out, **kwargs):
  model, params, tok = setup
  kwargs = dict(batch_rows=BATCH_ROWS, row_tokens=ROW_TOKENS, rows_per_chunk=ROWS_PER_CHUNK,
                log=lambda s: None) | kwargs
  return encode_corpus(model, params, tok, docs, str(out), **kwargs)


@pytest.fixture(scope="module")
def reference_bank(setup, tmp_path_factory):
  out = tmp_path_factory.mktemp("ref") / "bank"
  stats = _encode(setup, _texts(WORD_COUNTS), out)
  return out, stats


def _files(path):
  """{relative path: bytes} of every file under a bank directory."""
  out = {}
  for root, _, names in os.walk(path):
    for n in names:
      full = os.path.join(root, n)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def _manifest(path, drop=("created", "updated", "manifest_sha256")):
  with open(os.path.join(path, "manifest.json")) as f:
    m = json.load(f)
  return {k: v for k, v in m.items() if k not in drop}


def test_encode_equals_each_document_encoded_alone(setup, reference_bank):
  model, params, tok = setup
  path, stats = reference_bank
  texts = _texts(WORD_COUNTS)
  bank = open_bank(str(path), model.config, model.msa, params=params, verify="full")
  assert bank.num_docs == len(texts) == stats.documents == stats.bank_documents
  assert stats.batches > 2 and stats.tokens > 0 and stats.seconds > 0
  encode = jax.jit(entry_points.encode_memory, static_argnums=0)
  template = np.asarray(tok.encode(pf.TEMPLATE_HEAD), np.int32)
  wrapped = [tok.encode(pf.wrap_document(i, text)) for i, text in enumerate(texts)]
  lengths = [len(ids) for ids in wrapped]
  for first in range(0, len(texts), BATCH_ROWS):  # the oracle: every document alone in a row
    memory = build_memory_batch([[ids] for ids in wrapped[first:first + BATCH_ROWS]],
                                batch_rows=BATCH_ROWS, seq_len_mem=ROW_TOKENS,
                                max_docs=ROW_TOKENS // model.msa.chunk_size,
                                chunk_size=model.msa.chunk_size, pad_id=tok.pad_id)
    alone = encode(model, params, memory, template)
    layers = jax.tree.map(np.asarray, alone.view.layers)
    for b, i in enumerate(range(first, min(first + BATCH_ROWS, len(texts)))):
      n = -(-lengths[i] // model.msa.chunk_size)
      start, stop = bank.doc_chunks(i)
      assert stop - start == n
      assert int(bank.display_ids[i]) == i and bank.index_of(i) == i
      assert bank.document_text(i) == texts[i]
      for r in range(len(model.msa.router_layers)):
        for name, want, rtol in (("router_keys", layers.k_r, 2**-8), ("content_k", layers.k, 0),
                                 ("content_v", layers.v, 0)):  # router keys in bf16 by default
          got = bank.read(name, r, start, stop)
          np.testing.assert_allclose(got.astype(np.float32), want[r, b, :n], rtol=rtol, atol=1e-5,
                                     err_msg=name)
          np.testing.assert_array_equal(bank.read_rows(name, r, [stop - 1, start]), got[[-1, 0]])
  assert min(lengths) <= 12 and max(lengths) > ROW_TOKENS - 20  # the lengths really differ
  assert bank.index_of(10**6) is None
  assert bank.router_key_dtype == "bfloat16"
  assert bank.read("router_keys", 0, 0, 1).dtype == jnp.bfloat16
  # format 4 keeps no template-head K/V: serving prefills the template head with every prompt
  assert sorted(bank.array_shapes()) == sorted(FORMAT_4_ARRAYS)
  assert sorted(os.listdir(path)) == sorted(FORMAT_4_ARRAYS + ("manifest.json",))


def test_kill_then_resume_gives_the_same_bank(setup, reference_bank, tmp_path):
  ref, _ = reference_bank
  out = tmp_path / "bank"

  def kill_after_two(stats):
    if stats.batches == 2:
      raise KeyboardInterrupt("simulated kill")

  texts = _texts(WORD_COUNTS)
  with pytest.raises(KeyboardInterrupt):
    _encode(setup, texts, out, on_commit=kill_after_two)
  with pytest.raises(BankError, match="interrupted after"):
    open_bank(str(out))
  partial = open_bank(str(out), allow_incomplete=True)
  assert 0 < partial.num_docs < len(texts)
  committed = partial.num_docs
  with pytest.raises(BankError, match="differ"):  # resuming with another corpus is refused
    _encode(setup, _texts(WORD_COUNTS, seed=1), out)
  with pytest.raises(BankError, match="same settings"):
    _encode(setup, texts, out, batch_rows=BATCH_ROWS + 1)
  stats = _encode(setup, texts, out)
  assert stats.resumed_documents == committed
  assert stats.documents == len(texts) - committed
  _assert_same_bank(out, ref)


def _assert_same_bank(out, ref):
  ours, theirs = _files(out), _files(ref)
  assert sorted(ours) == sorted(theirs)
  for name in ours:
    if name != "manifest.json":
      assert ours[name] == theirs[name], name
  assert _manifest(out) == _manifest(ref)
  assert open_bank(str(out)).num_docs == open_bank(str(ref)).num_docs


def test_kill_between_array_writes_and_manifest_then_resume(setup, reference_bank, tmp_path,
                                                            monkeypatch):
  """A kill after a batch's rows hit the disk but before its manifest commit: the resumed encode
  drops those rows and rewrites them, giving the same bank."""
  from msa_jax.memory import writer
  ref, _ = reference_bank
  out = tmp_path / "bank"
  real_write = writer.mf.write_manifest
  calls = []

  def dies_on_fourth_commit(path, manifest):
    calls.append(path)
    if len(calls) == 4:
      raise KeyboardInterrupt("killed before the manifest commit")
    real_write(path, manifest)

  monkeypatch.setattr(writer.mf, "write_manifest", dies_on_fourth_commit)
  with pytest.raises(KeyboardInterrupt):
    _encode(setup, _texts(WORD_COUNTS), out)
  monkeypatch.setattr(writer.mf, "write_manifest", real_write)
  partial = open_bank(str(out), allow_incomplete=True)
  assert partial.array_shapes()["router_keys"][0][1] > partial.num_chunks  # uncommitted rows
  _encode(setup, _texts(WORD_COUNTS), out)
  _assert_same_bank(out, ref)


def test_append_equals_encoding_everything_at_once(setup, reference_bank, tmp_path):
  model, params, _ = setup
  ref, _ = reference_bank
  texts = _texts(WORD_COUNTS)
  out = tmp_path / "bank"
  _encode(setup, texts[:5], out)
  before = open_bank(str(out))
  old_rows = before.read("content_k", 1, 0, before.num_chunks)
  with pytest.raises(BankError, match="already exists"):
    _encode(setup, texts[5:], out)

  def kill_after_one(stats):
    if stats.batches == 1:
      raise KeyboardInterrupt("simulated kill")

  with pytest.raises(KeyboardInterrupt):
    _encode(setup, texts[5:], out, append=True, on_commit=kill_after_one)
  with pytest.raises(BankError, match=r"holds an interrupted append; resume it by running the "
                                      r"same append again, with --append \(append=True\)"):
    _encode(setup, texts[5:], out)
  stats = _encode(setup, texts[5:], out, append=True)
  assert stats.resumed_documents > 0 and stats.bank_documents == len(texts)
  bank, whole = open_bank(str(out), model.config, model.msa, params=params), open_bank(str(ref))
  np.testing.assert_array_equal(bank.read("content_k", 1, 0, before.num_chunks), old_rows)
  np.testing.assert_array_equal(bank.doc_chunk_offsets, whole.doc_chunk_offsets)
  np.testing.assert_array_equal(bank.display_ids, whole.display_ids)
  assert [bank.document_text(i) for i in range(bank.num_docs)] == texts
  for r in range(2):
    for name in ("router_keys", "content_k", "content_v"):
      np.testing.assert_allclose(bank.read(name, r, 0, bank.num_chunks),
                                 whole.read(name, r, 0, whole.num_chunks), atol=1e-5)


def test_int8_keys_carry_scales_and_an_append_keeps_them(setup, tmp_path):
  texts = _texts(WORD_COUNTS)
  exact, out = tmp_path / "f32", tmp_path / "int8"
  _encode(setup, texts, exact, router_key_dtype="float32")
  _encode(setup, texts[:5], out, router_key_dtype="int8")
  with pytest.raises(BankError, match="stores router keys in int8, not the requested bfloat16"):
    _encode(setup, texts[5:], out, append=True, router_key_dtype="bfloat16")
  _encode(setup, texts[5:], out, append=True)  # the bank's dtype
  bank, f32 = open_bank(str(out), verify="full"), open_bank(str(exact))
  hkv = bank.chunk_shape[0]
  assert bank.router_key_dtype == "int8" and bank.num_chunks == f32.num_chunks
  assert bank.array_shapes()["router_key_scales"] == ((2, bank.num_chunks, hkv), "float32")
  for r in range(2):
    keys = f32.read("router_keys", r, 0, f32.num_chunks)
    values = bank.read("router_keys", r, 0, bank.num_chunks)
    scale = bank.read_rows("router_key_scales", r, np.arange(bank.num_chunks))
    assert values.dtype == np.int8 and np.abs(values).max() == 127
    np.testing.assert_allclose(scale, np.abs(keys).max(-1) / 127, rtol=1e-5)
    err = np.abs(router_keys.dequantize(values, scale) - keys)
    assert np.all(err <= scale[..., None] * 0.51 + 1e-6)


def _as_old_format(setup, path, version):
  """Turns the current bank at `path` into one of format `version` (2 or 3): those also stored the
  template head's K/V [L, T, Hkv, D] (`template_k`, `template_v`, one storage chunk per layer,
  checksummed as one segment) and its token ids (`template_tokens`)."""
  model, _, tok = setup
  c, m = model.config, _manifest(path, drop=("manifest_sha256",))
  shape = (c.num_layers, model.msa.template_len, c.num_kv_heads, c.head_dim)
  rng = np.random.default_rng(version)
  for name in ("template_k", "template_v"):
    value = rng.standard_normal(shape).astype(c.compute_dtype)
    array = store.create_array(str(path), name, shape, value.dtype.name, (1,) + shape[1:])
    array.write(value).result()
    m["dtypes"][name] = value.dtype.name
    m["checksums"][name] = [[0, shape[0], mf.rows_digest(value)]]
  m["template_tokens"] = tok.encode(pf.TEMPLATE_HEAD)
  m["format_version"] = version
  m["manifest_sha256"] = mf.content_digest(m)
  (path / "manifest.json").write_text(json.dumps(m))


def test_a_format_2_bank_is_refused_and_converts(setup, tmp_path):
  model, params, _ = setup
  old = tmp_path / "old"
  _encode(setup, _texts(WORD_COUNTS[:6]), old, router_key_dtype="float32")
  exact = open_bank(str(old))
  keys = [exact.read("router_keys", r, 0, exact.num_chunks) for r in range(2)]
  content = exact.read("content_v", 1, 0, exact.num_chunks)
  _as_old_format(setup, old, 2)  # float32 keys, the template head's K/V, version 2
  with pytest.raises(BankError, match=r"format version 2, but this msa_jax reads version 4; "
                                      r"it holds float32 router keys and the template head's K/V; "
                                      r"convert it with `python tools/convert_bank.py "
                                      rf"--bank={old} --out=<new bank>`"):
    open_bank(str(old))
  convert_bank(str(old), str(tmp_path / "bf16"), log=lambda s: None)
  bank = open_bank(str(tmp_path / "bf16"), model.config, model.msa, params=params, verify="full")
  assert bank.manifest.format_version == 4 and bank.router_key_dtype == "bfloat16"
  assert sorted(os.listdir(tmp_path / "bf16")) == sorted(FORMAT_4_ARRAYS + ("manifest.json",))
  for r in range(2):
    np.testing.assert_array_equal(bank.read("router_keys", r, 0, bank.num_chunks),
                                  keys[r].astype(jnp.bfloat16))
  np.testing.assert_array_equal(bank.read("content_v", 1, 0, bank.num_chunks), content)
  assert bank.document_text(2) == exact.document_text(2)
  with pytest.raises(BankError, match="already exists"):
    convert_bank(str(old), str(tmp_path / "bf16"), log=lambda s: None)
  run = run_python(["tools/convert_bank.py", f"--bank={tmp_path / 'bf16'}",
                    f"--out={tmp_path / 'int8'}", "--key_dtype=int8"], cwd=ROOT,
                   env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert run.returncode == 0, run.stderr
  bank = open_bank(str(tmp_path / "int8"), verify="full")
  assert bank.router_key_dtype == "int8" and "router_key_scales" in bank.array_shapes()
  scale = bank.read_rows("router_key_scales", 0, np.arange(bank.num_chunks))
  err = np.abs(router_keys.dequantize(bank.read("router_keys", 0, 0, bank.num_chunks), scale)
               - keys[0])
  assert np.all(err <= scale[..., None] * 0.51 + np.abs(keys[0]) * 2**-8)
  assert sorted(os.listdir(tmp_path)) == ["bf16", "int8", "old"]  # no temporary directory left


def test_a_format_3_bank_is_refused_and_converts_to_what_an_encode_writes(setup, tmp_path):
  """Format 3 stored the template head's K/V, which serving never read: such a bank is refused,
  naming that and the command that converts it, and the converted bank is byte for byte the one
  a current encode writes (int8 keys and their scales kept as they are)."""
  model, params, _ = setup
  ref, old = tmp_path / "ref", tmp_path / "old"
  _encode(setup, _texts(WORD_COUNTS[:6]), ref, router_key_dtype="int8")
  shutil.copytree(ref, old)
  _as_old_format(setup, old, 3)
  message = (r"format version 3, but this msa_jax reads version 4; it holds the template head's "
             r"K/V, which serving never reads; convert it with `python tools/convert_bank.py "
             rf"--bank={old} --out=<new bank>`, or re-encode the corpus")
  with pytest.raises(BankError, match=message):
    open_bank(str(old))
  with pytest.raises(BankError, match=message):  # nor is it appended to
    _encode(setup, ["moon"], old, append=True)
  run = run_python(["tools/convert_bank.py", f"--bank={old}", f"--out={tmp_path / 'new'}"],
                   cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert run.returncode == 0, run.stderr
  _assert_same_bank(tmp_path / "new", ref)
  bank = open_bank(str(tmp_path / "new"), model.config, model.msa, params=params, verify="full")
  assert bank.manifest.format_version == 4 and bank.router_key_dtype == "int8"
  with pytest.raises(BankError, match="already format 4 with int8 router keys: nothing to convert"):
    convert_bank(str(tmp_path / "new"), str(tmp_path / "again"), log=lambda s: None)
  assert sorted(os.listdir(tmp_path)) == ["new", "old", "ref"]  # no temporary directory left


def test_display_ids_from_the_corpus_and_duplicates(setup, tmp_path):
  docs = [Document("alpha beta", 40), Document("gamma", 7), Document("moon river", None)]
  _encode(setup, docs, tmp_path / "bank")
  bank = open_bank(str(tmp_path / "bank"))
  assert bank.display_ids.tolist() == [40, 7, 2]
  assert bank.index_of(7) == 1 and bank.index_of(0) is None
  with pytest.raises(BankError, match="display id 7 is already used"):
    _encode(setup, [Document("stone", 7)], tmp_path / "bank", append=True)
  assert open_bank(str(tmp_path / "bank")).num_docs == 3  # refused before anything was written


def test_bad_corpora_fail_clearly_and_lose_nothing(setup, reference_bank, tmp_path):
  model, params, tok = setup
  with pytest.raises(BankError, match="no documents"):
    _encode(setup, [], tmp_path / "empty")
  assert not os.path.exists(tmp_path / "empty")
  too_long = " ".join(["moon"] * 200)
  with pytest.raises(BankError, match=r"document 0 .* longer than a row \(row_tokens=128\)"):
    _encode(setup, [too_long], tmp_path / "long")
  assert not os.path.exists(tmp_path / "long")
  small_limit = model.clone(config=model.config.replace(max_position_embeddings=32))
  with pytest.raises(BankError, match="longer than the model's limit"):
    encode_corpus(small_limit, params, tok, ["alpha " * 40], str(tmp_path / "limit"),
                  batch_rows=BATCH_ROWS, row_tokens=ROW_TOKENS, log=lambda s: None)
  # a bad document later in the corpus: the batches before it stay committed and resumable
  texts = _texts(WORD_COUNTS)
  out = tmp_path / "later"
  with pytest.raises(BankError, match="document 9 of the corpus"):
    _encode(setup, texts[:9] + [too_long], out)
  committed = open_bank(str(out), allow_incomplete=True).num_docs
  assert committed > 0
  stats = _encode(setup, texts, out)  # fixed corpus: resumes after the committed documents
  assert stats.resumed_documents == committed
  ref, _ = reference_bank
  assert _manifest(out) == _manifest(ref)
  # appending a bad document to a finished bank leaves it finished and unchanged
  with pytest.raises(BankError, match="longer than a row"):
    _encode(setup, [too_long], out, append=True)
  assert open_bank(str(out)).num_docs == len(texts)
  with pytest.raises(BankError, match="no bank at"):
    _encode(setup, texts, tmp_path / "missing", append=True)


def test_a_kill_during_the_first_commit_leaves_nothing_the_next_run_keeps(setup, tmp_path):
  stale = tmp_path / ".bank.tmp-0123abcd"  # what a SIGKILL inside the first commit leaves
  (stale / "router_keys").mkdir(parents=True)
  logs = []
  _encode(setup, ["moon"], tmp_path / "bank", log=logs.append)
  assert sorted(os.listdir(tmp_path)) == ["bank"]
  assert f"removed {stale}, left by an encode killed before its first commit" in logs


def test_out_that_is_not_a_bank(setup, tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(BankError, match="is a file, not a bank directory"):
    _encode(setup, ["moon"], a_file)
  with pytest.raises(BankError, match="it is a file, not a bank directory"):
    open_bank(str(a_file))
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("x")
  with pytest.raises(BankError, match="is a directory but not a bank .* choose a new or empty"):
    _encode(setup, ["moon"], other)
  assert os.listdir(other) == ["notes.txt"]
  empty = tmp_path / "empty"
  empty.mkdir()
  _encode(setup, ["moon"], empty)
  assert open_bank(str(empty)).num_docs == 1


def test_foreign_bank_is_refused(setup, reference_bank):
  model, params, tok = setup
  path, _ = reference_bank
  other = model.msa.replace(chunk_size=8)
  with pytest.raises(BankError, match=r"another model configuration \(msa.chunk_size: bank 4, "
                                      r"given 8\)"):
    open_bank(str(path), model.config, other)
  with pytest.raises(BankError, match="model.hidden_size"):
    open_bank(str(path), model.config.replace(hidden_size=32), model.msa)
  # knobs that do not change encoding are not a different model
  open_bank(str(path), model.config.replace(scan_layers=True, remat_policy="full"),
            model.msa.replace(top_k_docs=7, score_mode="scaled_dot"))
  other_params = jax.tree.map(lambda x: x, params)
  other_params["layers_0"]["attn"]["k_proj"]["kernel"] = (
      other_params["layers_0"]["attn"]["k_proj"]["kernel"] * 1.01)
  with pytest.raises(BankError, match="other model weights"):
    open_bank(str(path), model.config, model.msa, params=other_params)
  with pytest.raises(BankError, match="other model weights"):
    encode_corpus(model, other_params, tok, ["moon"], str(path), append=True,
                  batch_rows=BATCH_ROWS, row_tokens=ROW_TOKENS, log=lambda s: None)
  assert open_bank(str(path)).num_docs == len(WORD_COUNTS)


def test_an_aligned_bank_holds_the_training_ids(setup, reference_bank, tmp_path):
  """With align_doc_id a bank encodes each document from the ids its training samples hold
  (`record_step_sample`): its chunks equal those ids encoded alone. A bank of the other layout is
  another model configuration; official-layout banks keep their fingerprint."""
  model, params, tok = setup
  aligned = MSAForCausalLM(model.config, model.msa.replace(align_doc_id=True))
  p = aligned.msa.chunk_size
  texts, ids = _texts([1, 5, 9, 30]), [7, 12, 300, 4]
  path = str(tmp_path / "aligned")
  stats = encode_corpus(aligned, params, tok, [Document(t, i) for t, i in zip(texts, ids)], path,
                        batch_rows=BATCH_ROWS, row_tokens=ROW_TOKENS, log=lambda s: None)
  record = make_record(texts, "which?", "this", [[0]], doc_ids=ids)
  docs = record_step_sample(record, 0, tok, align_to=p).documents
  assert docs != record_step_sample(record, 0, tok).documents
  assert stats.tokens == sum(len(d) for d in docs)
  bank = open_bank(path, aligned.config, aligned.msa, params=params, verify="full")
  encode = jax.jit(entry_points.encode_memory, static_argnums=0)
  template = np.asarray(tok.encode(pf.TEMPLATE_HEAD), np.int32)
  memory = build_memory_batch([[d] for d in docs], batch_rows=len(docs), seq_len_mem=ROW_TOKENS,
                              max_docs=ROW_TOKENS // p, chunk_size=p, pad_id=tok.pad_id)
  alone = jax.tree.map(np.asarray, encode(aligned, params, memory, template).view.layers)
  for b, doc in enumerate(docs):
    start, stop = bank.doc_chunks(b)
    assert stop - start == -(-len(doc) // p) and int(bank.display_ids[b]) == ids[b]
    for r in range(len(aligned.msa.router_layers)):
      for name, want in (("content_k", alone.k), ("content_v", alone.v)):
        np.testing.assert_allclose(bank.read(name, r, start, stop), want[r, b, :stop - start],
                                   rtol=0, atol=1e-5, err_msg=name)
  with pytest.raises(BankError, match=r"msa.align_doc_id: bank True, given False"):
    open_bank(path, model.config, model.msa)
  with pytest.raises(BankError, match=r"msa.align_doc_id: bank False, given True"):
    open_bank(str(reference_bank[0]), aligned.config, aligned.msa)
  assert "msa.align_doc_id" not in mf.encoding_config(model.config, model.msa)


def _copy(path, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(path, dst)
  return dst


def _chunk_file(bank, name):
  files = sorted(f for f in _files(bank) if f.startswith(name + os.sep + "c"))
  return os.path.join(bank, files[0])


def test_corrupt_truncated_and_missing_files_are_detected(reference_bank, tmp_path):
  ref, _ = reference_bank
  bank = _copy(ref, tmp_path)
  target = _chunk_file(bank, "content_k")
  with open(target, "r+b") as f:
    f.seek(40)
    byte = f.read(1)
    f.seek(40)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(BankError, match="content_k is corrupt"):
    open_bank(str(bank))
  lazy = open_bank(str(bank), verify="index")  # not read at open, but every read checks crc32c
  with pytest.raises(BankError, match="content_k is corrupt"):
    lazy.read("content_k", 0, 0, 4)
  np.testing.assert_array_equal(lazy.read("content_v", 0, 0, 4),
                                open_bank(str(ref)).read("content_v", 0, 0, 4))

  with open(target, "r+b") as f:  # truncation
    f.truncate(20)
  with pytest.raises(BankError, match="content_k is corrupt"):
    open_bank(str(bank))
  shutil.rmtree(bank)

  bank = _copy(ref, tmp_path)
  os.remove(_chunk_file(bank, "router_keys"))
  with pytest.raises(BankError, match="router_keys is corrupt or incomplete"):
    open_bank(str(bank))
  shutil.rmtree(bank)

  bank = _copy(ref, tmp_path)
  os.remove(_chunk_file(bank, "display_ids"))  # index arrays are always verified
  with pytest.raises(BankError, match="display_ids"):
    open_bank(str(bank), verify="index")
  shutil.rmtree(bank)

  bank = _copy(ref, tmp_path)
  shutil.rmtree(bank / "text")
  with pytest.raises(BankError, match="array text is missing"):
    open_bank(str(bank))
  os.remove(bank / "manifest.json")
  with pytest.raises(BankError, match="no manifest.json"):
    open_bank(str(bank))
  with open(bank / "manifest.json", "w") as f:
    f.write("{not json")
  with pytest.raises(BankError, match="corrupt manifest"):
    open_bank(str(bank))
  shutil.rmtree(bank)

  bank = _copy(ref, tmp_path)  # an edited manifest fails its own checksum
  m = _manifest(bank, drop=())
  m["router_layers"] = [0, 2]  # as many layers: nothing else would notice
  with open(bank / "manifest.json", "w") as f:
    json.dump(m, f)
  with pytest.raises(BankError, match="manifest.json: the manifest does not match its checksum"):
    open_bank(str(bank), verify="full")
  m["router_layers"] = [1, 3]
  m["num_chunks"] += 5  # one that commits more than the arrays hold (checksummed again)
  m["manifest_sha256"] = mf.content_digest({k: v for k, v in m.items() if k != "manifest_sha256"})
  with open(bank / "manifest.json", "w") as f:
    json.dump(m, f)
  with pytest.raises(BankError, match="truncated"):
    open_bank(str(bank))
  with pytest.raises(BankError, match="no bank at"):
    open_bank(str(tmp_path / "nowhere"))

"""`BankMemoryView` (msa_jax/memory/bank_view.py): per layer, the bank's route/gather equals the
in-memory `MemoryView`'s on the same documents in every tier (device, pinned_host, tensorstore);
`entry_points.prefill` over a bank gives the same routing and logits as over the `MemoryView` from
`encode_memory` (scanned and unscanned layers, batch replicated or sharded); and a bank written by
the encoder and reopened from disk does too."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import config as cfglib
from msa_jax.data import prompt_format as pf
from msa_jax.data.batch_builder import Sample, build_batch
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.memory import open_bank, routing, tiers
from msa_jax.memory.bank_view import open_view
from msa_jax.memory.encode import encode_corpus
from msa_jax.model import entry_points, router
from msa_jax.model.model import MSAForCausalLM
from msa_jax.model.param_layout import stack_layers
from msa_jax.sharding import make_mesh
from msa_jax.training.model_setup import dummy_batch
from tests.bank_fixtures import bank_from_encoded

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "models", "tiny_msa", "tokenizer.json")
DOC_LENGTHS = [5, 30, 3, 9, 1, 14, 7, 2]  # 2 to 8 chunks of P=4; 8 documents on up to 8 shards
_prefill = jax.jit(entry_points.prefill, static_argnums=0)
# the in-memory view's reference also keeps every document's score
_scored_prefill = jax.jit(functools.partial(entry_points.prefill, document_scores=True),
                          static_argnums=0)
_encode = jax.jit(entry_points.encode_memory, static_argnums=0)


@pytest.fixture(scope="module")
def setup():
  model_cfg, msa_cfg = cfglib.preset("tiny")  # router layers 2, 3; P = 4
  model_cfg = model_cfg.replace(vocab_size=832, compute_dtype="float32")
  model = MSAForCausalLM(model_cfg, msa_cfg.replace(top_k_docs=3))
  memory, prompt = dummy_batch(model_cfg, model.msa)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), prompt, memory)["params"])
  rng = np.random.default_rng(0)  # random weights without compiling init
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  return model, params


def _batch(model, documents, rng, rows=2):
  """Every row holds all `documents` (the bank is shared by all requests); questions differ."""
  samples = [Sample(documents=documents, template_head=[1, 2, 3],
                    question=list(rng.integers(5, 800, 4)), template_tail=[4],
                    answer=list(rng.integers(5, 800, 3)), positive_docs=[0]) for _ in range(rows)]
  memory, prompt = build_batch(samples, seq_len_mem=sum(map(len, documents)) + 4, seq_len_prompt=16,
                               max_docs=len(documents), chunk_size=model.msa.chunk_size,
                               question_position=model.msa.question_position, pad_id=0)
  return jax.tree.map(jnp.asarray, memory), jax.tree.map(jnp.asarray, prompt)


@pytest.fixture(scope="module")
def encoded(setup):
  model, params = setup
  rng = np.random.default_rng(1)
  documents = [list(rng.integers(5, 800, n)) for n in DOC_LENGTHS]
  memory, prompt = _batch(model, documents, rng)
  enc = _encode(model, params, memory, [1, 2, 3])
  logits, out = _scored_prefill(model, params, prompt, enc.view)
  return enc.view, prompt, np.asarray(logits), out


def _expected_order(ref_scores, num_docs, k):
  return np.argsort(-ref_scores[:num_docs], kind="stable")[:min(k, num_docs)]


@pytest.mark.parametrize("tier", tiers.TIERS)
def test_layer_route_and_gather_equal_the_memory_view(setup, encoded, tier):
  model, _ = setup
  view, _, _, _ = encoded
  bank = bank_from_encoded(view)
  bank_view = open_view(bank, make_mesh((8,), ("memory",)), model.msa, tier=tier, slot_multiple=4)
  assert bank_view.spec.tier == tier
  if tier == "pinned_host":
    assert bank_view.layers.content_k.sharding.memory_kind == tiers.host_memory_kind(
        jax.devices()[0])
  rng = np.random.default_rng(2)
  q_r = jnp.asarray(rng.standard_normal((2, 5, 4, 16)), jnp.float32)
  mask = jnp.asarray([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], bool)
  k = model.msa.top_k_docs
  for layer in model.msa.router_layers:
    ref_layer = view.at(layer)
    ref = ref_layer.route(q_r, mask, model.msa)
    ref_scores = np.asarray(ref_layer.score_documents(q_r, mask, model.msa).scores)
    bank.rows_read = 0
    got, (gk, gv, gmask) = jax.jit(lambda q, m, lm: (lambda s: (s, lm.gather(s)))(
        lm.route(q, m, model.msa)))(q_r, mask, bank_view.at(layer))
    assert isinstance(got, router.Selection)  # the one selection type of every view
    rk, rv, rmask = ref_layer.gather(ref)
    for b in range(2):
      order = _expected_order(ref_scores[b], bank.num_docs, k)
      np.testing.assert_array_equal(np.asarray(got.doc_index[b]), order)
      np.testing.assert_allclose(np.asarray(got.scores[b]), ref_scores[b, order], rtol=1e-6)
      # the gathered chunks are exactly the selected documents' chunks (bit for bit)
      for g, r in ((gk, rk), (gv, rv)):
        rows = np.asarray(g[b])[np.asarray(gmask[b])].reshape(-1, 32)
        want = np.asarray(r[b])[np.asarray(rmask[b])].reshape(-1, 32)
        np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(want, axis=0))
        assert len(rows) == len(want)
    if tier == "tensorstore":  # only the selected documents' chunks were read, k and v
      assert bank.rows_read == 2 * int(np.asarray(gmask).sum())
    else:
      assert bank.rows_read == 0


def _prefill_bank(model, params, prompt, bank, mesh, tier, batch_axis=None):
  view = open_view(bank, mesh, model.msa, tier=tier, batch_axis=batch_axis, slot_multiple=4)
  logits, out = _prefill(model, params, prompt, view)
  return np.asarray(logits), out


def _check_prefill(model, prompt, logits, out, ref_logits, ref_out, num_docs):
  valid = np.asarray(prompt.segment_ids).astype(bool)
  err = float(np.abs(logits - ref_logits)[valid].max())
  assert err < 1e-5, err
  k = min(model.msa.top_k_docs, num_docs)
  ref_scores = np.asarray(ref_out.doc_scores)  # [L_r, B, C]
  for r in range(len(model.msa.router_layers)):
    for b in range(logits.shape[0]):
      order = _expected_order(ref_scores[r, b], num_docs, k)
      # cosine scores are bounded by 1: an absolute tolerance at float32 rounding of O(1) terms
      np.testing.assert_allclose(np.asarray(out.selection.scores[r, b, :k]),
                                 ref_scores[r, b, order], rtol=0, atol=1e-6)
      assert np.asarray(out.selection.valid[r, b]).sum() == k


def test_prefill_over_a_bank_equals_the_memory_view(setup, encoded):
  model, params = setup
  view, prompt, ref_logits, ref_out = encoded
  bank = bank_from_encoded(view)
  per_tier = {}
  for tier in ("device", "tensorstore"):  # batch replicated over an 8-shard memory axis
    per_tier[tier] = _prefill_bank(model, params, prompt, bank, make_mesh((8,), ("memory",)), tier)
    _check_prefill(model, prompt, *per_tier[tier], ref_logits, ref_out, bank.num_docs)
  # the tiers give identical results (their gathers are exact copies of the same rows)
  np.testing.assert_array_equal(per_tier["tensorstore"][0], per_tier["device"][0])
  np.testing.assert_array_equal(per_tier["tensorstore"][1].selection.scores,
                                per_tier["device"][1].selection.scores)
  # pinned_host, scanned layers (the view's `span`), the batch sharded over `data`
  scanned = model.clone(config=model.config.replace(scan_layers=True))
  stacked = stack_layers(params, model.config.num_layers, model.msa.router_layers)
  logits, out = _prefill_bank(scanned, stacked, prompt, bank, make_mesh((2, 4), ("data", "memory")),
                              "pinned_host", batch_axis="data")
  _check_prefill(model, prompt, logits, out, ref_logits, ref_out, bank.num_docs)


def test_encoded_bank_reopened_from_disk_routes_and_prefills_like_the_memory_view(setup, tmp_path):
  model, params = setup
  tok = Tokenizer.from_file(TOKENIZER)
  words = "alpha beta gamma delta river stone cloud fire water moon".split()
  rng = np.random.default_rng(3)
  texts = [" ".join(rng.choice(words, n)) for n in (2, 20, 6, 1, 12)]
  encode_corpus(model, params, tok, texts, str(tmp_path / "bank"), batch_rows=2, row_tokens=64,
                router_key_dtype="float32", log=lambda s: None)  # exact keys: exact routing
  bank = open_bank(str(tmp_path / "bank"), model.config, model.msa, params=params)
  wrapped = [tok.encode(pf.wrap_document(i, t)) for i, t in enumerate(texts)]
  template = np.asarray(tok.encode(pf.TEMPLATE_HEAD), np.int32)
  memory, prompt = _batch(model, wrapped, rng)
  ref = _encode(model, params, memory, template)
  ref_logits, ref_out = _scored_prefill(model, params, prompt, ref.view)
  # the tensorstore tier reads through the bank at load (router keys) and per layer (content)
  logits, out = _prefill_bank(model, params, prompt, bank, make_mesh((4,), ("memory",),
                                                                     jax.devices()[:4]),
                              "tensorstore")
  _check_prefill(model, prompt, logits, out, np.asarray(ref_logits), ref_out, len(texts))


def test_bad_requests_fail_clearly(setup, encoded):
  model, _ = setup
  bank = bank_from_encoded(encoded[0])
  with pytest.raises(routing.RoutingError, match="no 'memory' axis"):
    open_view(bank, make_mesh((8,), ("data",)), model.msa)
  with pytest.raises(routing.RoutingError, match="unknown content tier"):
    open_view(bank, make_mesh((8,), ("memory",)), model.msa, tier="disk")
  with pytest.raises(routing.RoutingError, match=r"router layers \[2, 3\] but the model routes in"):
    open_view(bank, make_mesh((8,), ("memory",)), model.msa.replace(router_layers=(1, 3)))

"""The record evaluator (`evaluation.evaluate_records`) against independent truths: its generations
equal greedy decoding by a fresh prefill of the whole prompt at every step (no cache; the oracle is
written here), its router recall@n ranks every document by the training forward's scores (a numpy
oracle; n beyond the k a selection holds), and its rows carry `metrics.score_answer`'s metrics."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import config as cfglib
from msa_jax import evaluation
from msa_jax.data import prompt_format as pf
from msa_jax.data.batch_builder import build_batch
from msa_jax.data.synthetic import generate, world_tokenizer
from msa_jax.data.transcript import record_step_sample
from msa_jax.inference import metrics
from msa_jax.model import entry_points
from msa_jax.model.model import MSAForCausalLM

TOKENIZER = world_tokenizer()
SMALL = dict(memory_tokens=320, min_doc_tokens=8, max_doc_tokens=40)
SHAPES = evaluation.EvalShapes(seq_len_mem=384, max_docs=16, seq_len_prompt=512, max_new_tokens=5)


@pytest.fixture(scope="module")
def setup():
  model_cfg, msa_cfg = cfglib.preset("tiny")  # k = 2
  model = MSAForCausalLM(model_cfg.replace(vocab_size=832, compute_dtype="float32"), msa_cfg)
  records = [generate("fact_lookup", 3, i, **SMALL) for i in range(2)]
  memory, prompt = _batch([record_step_sample(records[0], 0, TOKENIZER)], model)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), prompt, memory)["params"])
  return model, params, records


def _batch(samples, model):
  return build_batch(samples, seq_len_mem=SHAPES.seq_len_mem, seq_len_prompt=SHAPES.seq_len_prompt,
                     max_docs=SHAPES.max_docs, chunk_size=model.msa.chunk_size,
                     question_position=model.msa.question_position, pad_id=TOKENIZER.pad_id,
                     vocab_size=model.config.vocab_size)


@functools.lru_cache(maxsize=None)
def _jitted(model):
  """The oracle's entry points, jitted once per model: every call has the same padded shapes
  (SHAPES), so each compiles once instead of running op by op (the same computation)."""
  return (jax.jit(lambda p, m, h: entry_points.encode_memory(model, p, m, h).view),
          jax.jit(lambda p, q, v: entry_points.prefill(model, p, q, v)[0]),
          jax.jit(lambda p, m, q: entry_points.forward(model, p, m, q)))


def _greedy_by_prefill(model, params, sample, stop_id):
  """Greedy tokens continuing `sample`'s prompt, each step a fresh prefill of the whole prompt
  over the sample's own encoded memory."""
  encode, prefill, _ = _jitted(model)
  memory, _ = _batch([sample], model)
  head = jnp.asarray(TOKENIZER.encode(pf.TEMPLATE_HEAD), jnp.int32)
  view = encode(params, memory, head)
  written = []
  for _ in range(SHAPES.max_new_tokens):
    grown = dataclasses.replace(sample, answer=list(sample.answer) + written, answer_target=(),
                                answer_value=())
    _, prompt = _batch([grown], model)
    logits = prefill(params, prompt, view)
    last = int(np.asarray(prompt.segment_ids)[0].sum()) - 1
    written.append(int(np.argmax(np.asarray(logits)[0, last])))
    if written[-1] == stop_id:
      break
  return written


def _recall_oracle(scores, present, positives, n):
  """hits among the top n present documents ÷ min(#positives, n)."""
  order = np.argsort(-np.where(present, scores, -np.inf), kind="stable")[:n]
  hits = sum(bool(positives[d]) for d in order if present[d])
  return hits / min(int(positives.sum()), n)


def test_generations_recall_and_metrics_against_oracles(setup):
  model, params, records = setup
  out = evaluation.evaluate_records(model, params, TOKENIZER, records, SHAPES, batch_size=2)
  rows = out["records"]
  for index, (record, row) in enumerate(zip(records, rows)):
    align_to = model.msa.doc_align_to
    retrieve = dataclasses.replace(record_step_sample(record, 0, TOKENIZER, align_to=align_to),
                                   answer=[], answer_target=[])
    written = _greedy_by_prefill(model, params, retrieve, TOKENIZER.object_ref_end_id)
    assert row["written"] == TOKENIZER.decode(written)
    answer_step = evaluation._answer_prefix_sample(record, TOKENIZER, align_to)
    answered = _greedy_by_prefill(model, params, answer_step, TOKENIZER.im_end_id)
    assert row["answer_written"] == TOKENIZER.decode(answered)
    # the row's metrics are metrics.score_answer's, under its names
    gold = sorted({record.doc_ids[i] for i in record.hops[0]})
    assert row["gold_ids"] == gold and row["index"] == index
    want = metrics.score_answer(evaluation.parse_answer(TOKENIZER.decode(answered)),
                                record.answer.strip(),
                                evaluation.parse_ids(TOKENIZER.decode(written)), gold)
    assert {k: row[k] for k in want} == want
    # router recall@n over every document of the training forward, for n up to 16 > k = 2
    memory, prompt = _batch([retrieve], model)
    fwd = _jitted(model)[2](params, memory, prompt)
    positives = np.zeros(fwd.doc_scores.shape[-1], bool)
    positives[list(retrieve.positive_docs)] = True
    for r, layer in enumerate(model.msa.router_layers):
      for n in evaluation.RECALL_AT:
        want_recall = _recall_oracle(np.asarray(fwd.doc_scores)[r, 0],
                                     np.asarray(fwd.doc_present)[0], positives, n)
        assert row[f"router_recall@{n}/layer{layer}"] == pytest.approx(want_recall, abs=1e-6)
      assert row[f"router_recall@16/layer{layer}"] == 1.0  # every document is ranked
  summary = out["summary"]["all"]
  assert summary["n"] == len(records)
  assert set(metrics.METRICS) <= set(summary)

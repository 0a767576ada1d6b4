"""The teacher-forced probe: its classes partition the scored labels, its numbers equal a numpy
oracle over the training forward's logits, `ForcedView` puts the gold documents in every router
layer's selection, and the tool binary writes JSON or fails with one clear line."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from msa_jax import config as cfglib
from msa_jax.data import prompt_format as pf
from msa_jax.data.batch_builder import build_batch
from msa_jax.data.synthetic import generate, world_tokenizer
from msa_jax.data.transcript import num_steps, record_step_sample
from msa_jax.model import entry_points
from msa_jax.model import router
from msa_jax.model.forced_view import ForcedView, force_selection
from msa_jax.model.model import MSAForCausalLM
from msa_jax.model.param_layout import stack_layers
from msa_jax.training import probe as P
from tests.binary_runner import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = world_tokenizer()
SMALL = dict(memory_tokens=320, min_doc_tokens=8, max_doc_tokens=40)


def _records():
  """Each task the probe serves, one record with 3-digit display ids (ids of several tokens), one
  with a miss round before each of its hops."""
  fact = generate("fact_lookup", 3, 0, **SMALL)
  chain = generate("multi_hop", 3, 0, num_hops=2, **SMALL)
  wrong = [i for i in range(len(chain.documents)) if i not in chain.gold_ids]
  return [fact.with_ids([100 + 7 * i for i in range(len(fact.documents))]),
          generate("fact_lookup", 3, 1, **SMALL),
          chain.with_misses([(wrong[0],), (wrong[1],)]),
          generate("niah_single", 3, 0, **SMALL)]


def _model(top_k=2, scan=False, seed=0):
  model_cfg, msa_cfg = cfglib.preset("tiny")
  model_cfg = model_cfg.replace(vocab_size=832, compute_dtype="float32")
  model = MSAForCausalLM(model_cfg, msa_cfg.replace(top_k_docs=top_k))
  memory, prompt = _batch([record_step_sample(_records()[0], 0, TOKENIZER)], model)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), prompt, memory)["params"])
  if scan:
    model = model.clone(config=model.config.replace(scan_layers=True))
    params = stack_layers(params, model.config.num_layers, model.msa.router_layers)
  return model, params


def _batch(samples, model, seq_len_prompt=512):
  return build_batch(samples, seq_len_mem=384, seq_len_prompt=seq_len_prompt, max_docs=16,
                     chunk_size=model.msa.chunk_size, question_position=model.msa.question_position,
                     pad_id=TOKENIZER.pad_id, vocab_size=model.config.vocab_size)


def _kind(record, step):
  rounds = record.rounds
  if step == len(rounds):
    return "answer"
  return "after_miss" if step and rounds[step - 1].miss else "retrieval"


def _steps(records):
  """(record, step, kind) of every step."""
  return [(r, s, _kind(r, s)) for r in records for s in range(num_steps(r))]


def test_classes_partition_the_scored_labels():
  model, _ = _model()
  for record, step, kind in _steps(_records()):
    sample = record_step_sample(record, step, TOKENIZER)
    classes = P.target_classes(record, step, sample, TOKENIZER)
    for s in (sample, P.append_gold_text(record, step, sample, TOKENIZER)):
      _, prompt = _batch([s], model)
      labels = np.asarray(prompt.labels)[0]
      grid = P.class_grid(s, classes, labels.size)
      np.testing.assert_array_equal(grid >= 0, labels >= 0)
      assert set(grid[grid >= 0]) <= {P.FORMAT, P.ID_DIGITS, P.ANSWER, P.DECISION}
      text = lambda c: TOKENIZER.decode(labels[grid == c])
      if kind != "answer":
        hop = record.hops[record.rounds[step].hop]
        assert text(P.ID_DIGITS) == "".join(str(record.doc_ids[i]) for i in hop)
        assert text(P.DECISION) == "["
        assert text(P.FORMAT) == "]" + "[]" * (len(hop) - 1) + "<|object_ref_end|>"
        assert not (grid == P.ANSWER).any()
      else:
        assert text(P.ANSWER).strip() == record.answer
        assert text(P.DECISION) == pf.END_OF_RETRIEVE
        assert text(P.FORMAT).replace(" ", "") == (pf.ANSWER_PREFIX +
                                                    "<|im_end|>").replace(" ", "")
        assert not (grid == P.ID_DIGITS).any()


def _appended_independently(record, step, sample):
  """The gold text after the context, tokenized as one string (the probe tokenizes two pieces)."""
  if step == len(record.rounds):
    return sample
  hop = record.hops[record.rounds[step].hop]
  text = "".join(f"[{record.doc_ids[i]}]. {record.documents[i]}\n" for i in hop)
  extra = TOKENIZER.encode(text + "<|object_ref_end|>")
  injected = [True] * (len(extra) - 1) + [False]  # the closing delimiter is not document text
  return dataclasses.replace(sample, context=list(sample.context) + extra,
                             context_route=list(sample.context_route) + [False] * len(extra),
                             context_target=list(sample.context_target) + injected)


def _oracle_class(label_text, kind, index, prefix_len):
  """A scored label's class from its text: a step's first target is its decision; digits of a
  round are ids; in the answer step the targets after `<End-of-Retrieve>The answer to the
  question is:` but the last are the answer."""
  if index == 0:
    return "decision"
  if kind != "answer":
    return "id_digits" if label_text.isdigit() else "format"
  return "answer" if prefix_len <= index and label_text.strip() and label_text != "<|im_end|>" \
      else "format"


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _accumulate(sums, cond, logits, prompt, steps):
  """Adds each row's scored labels to sums[(cond, kind, class)] = [count, correct, logp]."""
  prefix_len = 1 + len(TOKENIZER.encode(pf.ANSWER_PREFIX.strip()))
  logp = _log_softmax(np.asarray(logits, np.float64))
  labels = np.asarray(prompt.labels)
  for b, (_, _, k) in enumerate(steps):
    place, digits_right = 0, []
    for j, pos in enumerate(np.flatnonzero(labels[b] >= 0)):
      cls = _oracle_class(TOKENIZER.decode([labels[b, pos]]), k, j, prefix_len)
      right = int(np.argmax(logits[b, pos]) == labels[b, pos])
      for key in ((cond, k, cls), (cond, k, "all")):
        s = sums.setdefault(key, [0, 0, 0.0])
        s[0] += 1
        s[1] += right
        s[2] += logp[b, pos, labels[b, pos]]
      # an id's digits are consecutive labels; any other label ends the id
      place = place + 1 if cls == "id_digits" else 0
      if cls == "id_digits":
        s = sums.setdefault((cond, k, "place", place - 1), [0, 0])
        s[0] += 1
        s[1] += right
        digits_right.append(right)
    if digits_right:
      s = sums.setdefault((cond, k, "exact", None), [0, 0])
      s[0] += 1
      s[1] += all(digits_right)


def test_probe_equals_a_numpy_oracle_over_the_training_forward():
  model, params = _model()
  records = _records()
  result = P.probe(model, params, TOKENIZER, records, batch_size=3, rows_per_prefill=5)
  steps = _steps(records)
  normal = [record_step_sample(r, s, TOKENIZER) for r, s, _ in steps]
  appended = [_appended_independently(r, s, x) for (r, s, _), x in zip(steps, normal)]
  forward = jax.jit(lambda p, m, pr: model.apply({"params": p}, pr, m,
                                                 method=MSAForCausalLM.prompt_logits))
  sums = {}
  for cond, samples in (("normal", normal), ("gold_text_appended", appended)):
    memory, prompt = _batch(samples, model)
    logits, out = forward(params, memory, prompt)
    _accumulate(sums, cond, np.asarray(logits), prompt, steps)
    if cond == "normal":
      scores, present = np.asarray(out.doc_scores), np.asarray(out.doc_present)
      top1 = np.argmax(np.where(present, scores, -np.inf), axis=-1)  # [L, B]
      hits = np.array([[t in x.positive_docs for t, x in zip(row, samples)] for row in top1])
      for kind in P.STEP_KINDS:
        rows = [b for b, (_, _, k) in enumerate(steps) if k == kind]
        want = hits[:, rows].mean(axis=1)
        got = list(result["router_recall@1"][kind].values())
        np.testing.assert_allclose(got, want, atol=1e-9, err_msg=kind)
  # gold_forced: the gold documents forced into the selection of a row-aligned prefill
  memory, prompt = _batch(normal, model)
  encode, prefill, prefill_forced = _jitted(model)
  view = encode(params, memory)
  gold = np.zeros((len(normal), view.layers.chunk_doc.shape[-1]), bool)
  for b, s in enumerate(normal):
    gold[b, list(s.positive_docs)] = True
  logits, out = prefill_forced(params, prompt, view, gold)
  _accumulate(sums, "gold_forced", np.asarray(logits), prompt, steps)
  checked = set()
  places = {key: v for key, v in sums.items() if len(key) == 4}
  for key, (rows, right) in places.items():
    if key[2] == "exact":
      assert result["ids_exact"][key[0]][key[1]] == pytest.approx(right / rows, abs=1e-9), key
    else:
      got = result["id_digits_by_place"][key[0]][key[1]][key[3]]
      assert got == pytest.approx(right / rows, abs=1e-9), key
  assert {(c, k, p) for c, k, what, p in places if what == "place"} == \
      {(c, k, p) for c, kinds in result["id_digits_by_place"].items() for k, per in kinds.items()
       for p in range(len(per))}
  assert max(len(per) for kinds in result["id_digits_by_place"].values()
             for per in kinds.values()) == 3  # the first record's 3-digit ids
  for key in places:
    del sums[key]
  for (cond, kind, cls), (count, correct, logp) in sums.items():
    got = result["metrics"][cond][kind][cls]
    assert got["count"] == count, (cond, kind, cls)
    assert got["accuracy"] == pytest.approx(correct / count, abs=1e-9), (cond, kind, cls)
    assert got["mean_logprob"] == pytest.approx(logp / count, abs=1e-4), (cond, kind, cls)
    checked.add(cls)
  assert checked == {"format", "id_digits", "answer", "decision", "all"}
  for kind, per in result["gold_in_selection"]["gold_forced"].items():
    assert all(v == 1.0 for v in per.values()), kind
  assert result["samples"] == {"retrieval": 5, "after_miss": 2, "answer": 4}


@pytest.mark.parametrize("scan", [False, True])
def test_forced_view_puts_the_gold_documents_in_every_layers_selection(scan):
  model, params = _model(top_k=2, scan=scan, seed=1)
  samples = [record_step_sample(generate("fact_lookup", 5, i, **SMALL), 0, TOKENIZER)
             for i in range(6)]
  memory, prompt = _batch(samples, model, seq_len_prompt=128)
  encode, prefill, prefill_forced = _jitted(model, document_scores=True)
  view = encode(params, memory)
  gold = np.zeros((len(samples), view.layers.chunk_doc.shape[-1]), bool)
  for b, s in enumerate(samples):
    gold[b, list(s.positive_docs)] = True
  plain_logits, plain = prefill(params, prompt, view)
  forced_logits, forced = prefill_forced(params, prompt, view, gold)
  cols = gold.shape[-1]
  selected = lambda o: np.asarray(jax.vmap(lambda s: s.mask(cols))(o.selection))  # [L, B, D]
  # the router's scores of the forced run (after the first router layer they see the forced
  # documents' output): the selection is their top-k with the gold replacing the lowest pick
  scores, present = np.asarray(forced.doc_scores), np.asarray(forced.doc_present)
  np.testing.assert_array_equal(scores[0], np.asarray(plain.doc_scores)[0])
  missed = 0
  for layer in range(scores.shape[0]):
    for b in range(len(samples)):
      s = np.where(present[b], scores[layer, b], -np.inf)
      k = min(model.msa.top_k_docs, present[b].sum())
      want = np.zeros_like(present[b])
      want[np.argsort(-s, kind="stable")[:k]] = True
      if not want[gold[b]].all():
        missed += 1
        want[np.argmin(np.where(want, s, np.inf))] = False
        want[gold[b]] = True
      np.testing.assert_array_equal(selected(forced)[layer, b], want)
      # the reported scores remain the router's
      index, valid = (np.asarray(x[layer, b]) for x in (forced.selection.doc_index,
                                                        forced.selection.valid))
      np.testing.assert_array_equal(np.asarray(forced.selection.scores[layer, b])[valid],
                                    s[index[valid]])
  assert missed > 0, "the random router found every gold document: nothing was forced"
  changed = (selected(forced) != selected(plain)).any(axis=(0, 2))
  valid = np.asarray(prompt.segment_ids) > 0
  diff = np.abs(np.asarray(forced_logits) - np.asarray(plain_logits)).max(axis=-1)
  assert (diff[changed][valid[changed]] > 0).any()  # the forced documents are attended
  np.testing.assert_array_equal(diff[~changed], 0.0)


def _jitted(model, document_scores=False):
  """encode_memory, prefill and prefill over ForcedView(view, forced), each as one jitted call
  (the same computation as running them op by op, compiled once instead of dispatched per op)."""
  head = np.asarray(TOKENIZER.encode(pf.TEMPLATE_HEAD), np.int32)
  return (jax.jit(lambda p, m: entry_points.encode_memory(model, p, m, head).view),
          jax.jit(lambda p, q, v: entry_points.prefill(model, p, q, v,
                                                       document_scores=document_scores)),
          jax.jit(lambda p, q, v, g: entry_points.prefill(model, p, q, ForcedView(v, g),
                                                          document_scores=document_scores)))


def _run_tool(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  return run_python(["tools/probe.py", *args], cwd=ROOT, env=env, timeout=300)


def test_tool_writes_json_and_fails_clearly_without_a_model(tmp_path):
  out = tmp_path / "probe.json"
  run = _run_tool("--model=models/tiny_msa", "--memory_tokens=1024", "--num_samples=2",
                  "--batch_size=2", "--seed=99", "--miss_rate=0.9", "--top_k_docs=1",
                  f"--out={out}")
  assert run.returncode == 0, run.stderr
  assert "gold_forced" in run.stdout and "recall@1" in run.stdout
  result = json.loads(out.read_text())
  assert result["settings"]["seed"] == 99 and result["records"] == 2
  assert result["metrics"]["normal"]["retrieval"]["id_digits"]["count"] > 0
  assert result["settings"]["miss_rate"] == 0.9
  assert result["settings"]["top_k_docs"] == 1  # the shipped model's 4, overridden
  assert all(v == 1.0 for v in result["gold_in_selection"]["gold_forced"]["retrieval"].values())
  assert "id digit by place" in run.stdout and result["ids_exact"]["normal"]["retrieval"] >= 0
  assert result["metrics"]["normal"]["after_miss"]["decision"]["count"] == result["samples"][
      "after_miss"] > 0  # one decision per step
  assert result["settings"]["doc_tokens"] == [16, 64]  # the shipped model's train_config.json
  assert "documents of 16-64 tokens; data settings from " in run.stdout
  assert [p.name for p in tmp_path.iterdir()] == ["probe.json"]  # no temporary left behind
  run = _run_tool("--model=models/tiny_msa", "--min_doc_tokens=40", "--max_doc_tokens=20")
  assert run.returncode == 1
  assert "need 0 < --min_doc_tokens <= --max_doc_tokens" in run.stderr.strip().splitlines()[-1]
  missing = tmp_path / "no_model"
  run = _run_tool(f"--model={missing}", f"--out={tmp_path / 'bad.json'}")
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == f"probe: no model directory at {missing}"
  assert "Traceback" not in run.stderr and not (tmp_path / "bad.json").exists()


def test_force_selection_ranks_the_forced_documents_into_the_top_k():
  """The oracle: the top-k by the router's scores, the lowest pick replaced by a missing forced
  document; the selection lists forced documents first and reports the router's scores."""
  rng = np.random.default_rng(3)
  scores = rng.standard_normal((64, 7)).astype(np.float32)
  present = rng.random((64, 7)) < 0.8
  forced = np.zeros((64, 7), bool)
  forced[np.arange(64), rng.integers(0, 7, 64)] = True
  forced &= present
  sel = force_selection(router.DocumentScores(jax.numpy.asarray(np.where(present, scores, -np.inf)),
                                              jax.numpy.asarray(present)), forced, 3)
  mask = np.asarray(sel.mask(7))
  missed = 0
  for b in range(64):
    s = np.where(present[b], scores[b], -np.inf)
    k = min(3, present[b].sum())
    want = np.zeros(7, bool)
    want[np.argsort(-s, kind="stable")[:k]] = True
    if not want[forced[b]].all():
      missed += 1
      want[np.argmin(np.where(want, s, np.inf))] = False
      want[forced[b]] = True
    np.testing.assert_array_equal(mask[b], want)
    index, valid = np.asarray(sel.doc_index[b]), np.asarray(sel.valid[b])
    assert forced[b][index[valid]].tolist() == sorted(forced[b][index[valid]], reverse=True)
    np.testing.assert_array_equal(np.asarray(sel.scores[b])[valid], s[index[valid]])
  assert missed > 0

"""Which route token wins the router's score for the gold document (BENCHMARKS.md issue 11 §12).

An ad hoc diagnosis, kept to reproduce §12: it wraps `router._reduce_queries` to record every
router layer's [B, T, C] token-chunk scores, runs the training forward of held-out fact lookups
(seed 4242, 4K memories, 16 name negatives) and counts, per router layer, the route token whose
score is highest on any chunk of the gold card. It also lists the last router layer's top-1
misses: the winner, whether it shares a name with the gold subject, and both scores.

    python experiments/results/session12_2026-12-03/route_token_trace.py models/tiny_msa 48
"""
import collections
import sys

import jax
import numpy as np

import msa_jax
from msa_jax.data.batch_builder import build_batch
from msa_jax.data.synthetic import tasks
from msa_jax.data.transcript import document_length_fn, record_step_sample
from msa_jax.model import entry_points, router

recorded = []
_reduce = router._reduce_queries


def _recording_reduce(s, route_mask, *args):
  jax.debug.callback(lambda x, y: recorded.append((np.asarray(x), np.asarray(y))), s, route_mask)
  return _reduce(s, route_mask, *args)


router._reduce_queries = _recording_reduce
m = msa_jax.load(sys.argv[1])
msa, tok, n = m.msa_config, m.tokenizer, int(sys.argv[2])
num_router_layers = len(msa.router_layers)
length = document_length_fn(tok, msa.doc_align_to)
forward = jax.jit(entry_points.forward, static_argnums=0)
winners, name_scores, misses = collections.Counter(), [], []
for i in range(n):
  recorded.clear()
  r = tasks.generate("fact_lookup", 4242, i, memory_tokens=4096, length_fn=length,
                     min_doc_tokens=16, max_doc_tokens=64, align_to=msa.doc_align_to,
                     name_negatives=16)
  s = record_step_sample(r, 0, tok, align_to=msa.doc_align_to)
  memory, prompt = build_batch(
      [s], seq_len_mem=-(-s.memory_len // 256) * 256, seq_len_prompt=256, max_docs=256,
      chunk_size=msa.chunk_size, question_position=msa.question_position, pad_id=tok.pad_id,
      vocab_size=m.model_config.vocab_size)
  out = forward(m.model, m.params, memory, prompt)
  doc_scores = np.asarray(out.doc_scores)[-1, 0, :len(r.documents)]  # also waits for `recorded`
  chunk_doc, tokens = np.asarray(memory.chunk_doc)[0], np.asarray(prompt.tokens)[0]
  subjects = [tasks.card_subject(d) for d in r.documents]
  gold = r.hops[0][0]
  first, last = subjects[gold].split()
  gold_chunks = np.where(chunk_doc == gold + 1)[0]
  for layer, (scores, route_mask) in enumerate(recorded[-num_router_layers:]):
    route = np.where(route_mask[0])[0]
    words = [tok.decode([int(tokens[t])]).strip() for t in route]
    per_token = scores[0][route][:, gold_chunks].max(axis=1)  # [route tokens]
    winners[(layer, words[int(np.argmax(per_token))])] += 1
    if layer == num_router_layers - 1:
      name_scores.append([per_token[words.index(first)], per_token[words.index(last)],
                          per_token.max()])
  top = int(np.argmax(doc_scores))
  if top != gold:
    shares = "last" if subjects[top].split()[1] == last else (
        "first" if subjects[top].split()[0] == first else "none")
    misses.append((i, subjects[gold], subjects[top], shares, float(doc_scores[gold]),
                   float(doc_scores[top])))
print("winning route token for the gold document (router layer, token): count")
for key, count in winners.most_common():
  print(" ", key, count)
print("last router layer, gold document: mean best score of the first-name token %.3f, "
      "last-name token %.3f, winning token %.3f" % tuple(np.mean(name_scores, axis=0)))
print(f"last router layer top-1: {n - len(misses)}/{n}; misses (record, gold, winner, shared "
      f"name, gold score, winner score):")
for miss in misses:
  print(" ", miss)

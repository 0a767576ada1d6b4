"""Which route token wins the router's score for the gold document (BENCHMARKS.md issue 11 §12).

An ad hoc diagnosis, kept to reproduce §12: it wraps `router._reduce_queries` to record every
router layer's [B, T, C] token-chunk scores, runs the training forward of held-out fact lookups
(seed 4242, 4K memories, 16 name negatives) and counts, per router layer, the route token whose
score is highest on any chunk of the gold card.

    python experiments/results/session12_2026-12-03/route_token_trace.py models/tiny_msa 48
"""
import sys, collections, numpy as np, jax, msa_jax
from msa_jax.data.synthetic import tasks
from msa_jax.data.transcript import document_length_fn, record_step_sample
from msa_jax.data.batch_builder import build_batch
from msa_jax.model import entry_points, router
DUMP = []
orig = router._reduce_queries
def spy(s, route_mask, query_reduce, *a):
  jax.debug.callback(lambda x, y: DUMP.append((np.asarray(x), np.asarray(y))), s, route_mask)
  return orig(s, route_mask, query_reduce, *a)
router._reduce_queries = spy
m = msa_jax.load(sys.argv[1]); msa = m.msa_config; tok = m.tokenizer; n = int(sys.argv[2])
L = document_length_fn(tok, 8)
fwd = jax.jit(entry_points.forward, static_argnums=0)
win = collections.Counter(); name_scores = []; summary = []
for i in range(n):
  DUMP.clear()
  r = tasks.generate("fact_lookup", 4242, i, memory_tokens=4096, length_fn=L, min_doc_tokens=16, max_doc_tokens=64, align_to=8, name_negatives=16)
  s = record_step_sample(r, 0, tok, align_to=8)
  memb, prompt = build_batch([s], seq_len_mem=((s.memory_len + 255)//256)*256, seq_len_prompt=256, max_docs=256, chunk_size=msa.chunk_size, question_position=msa.question_position, pad_id=tok.pad_id, vocab_size=m.model_config.vocab_size)
  out = fwd(m.model, m.params, memb, prompt); jax.block_until_ready(out.doc_scores)
  chunk_doc = np.asarray(memb.chunk_doc)[0]; toks = np.asarray(prompt.tokens)[0]
  g = r.hops[0][0]; first, last = tasks.card_subject(r.documents[g]).split()
  for layer, (sc, rm) in enumerate(DUMP[-3:]):
    rt = np.where(rm[0])[0]; words = [tok._tok.decode([int(toks[t])]).strip() for t in rt]
    cols = np.where(chunk_doc == g + 1)[0]
    per = sc[0][rt][:, cols]            # [route tokens, gold chunks]
    t, c = np.unravel_index(np.argmax(per), per.shape)
    win[(layer, words[t])] += 1
    if layer == 2:
      name_scores.append([per[words.index(first)].max(), per[words.index(last)].max(), per.max()])
print("winning route token for the gold document (layer idx, token): count")
for k, v in sorted(win.items(), key=lambda kv: -kv[1]): print(" ", k, v)
ns = np.array(name_scores); print("last router layer, gold doc: mean best score of the first-name token %.3f, last-name token %.3f, winning token %.3f" % tuple(ns.mean(0)))

"""Random MSA batches for model tests, built with the host batch builder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax.data.batch_builder import Sample, build_batch


def random_samples(rng: np.random.Generator, doc_lengths, vocab: int = 250, question_len: int = 4):
  """One sample per entry of `doc_lengths` (a list of document lengths per sample)."""
  samples = []
  for lengths in doc_lengths:
    docs = [list(rng.integers(5, vocab, n)) for n in lengths]
    positives = sorted(rng.choice(len(docs), size=min(2, len(docs)), replace=False).tolist())
    samples.append(Sample(documents=docs, template_head=[1, 2, 3],
                          question=list(rng.integers(5, vocab, question_len)),
                          template_tail=[4], answer=list(rng.integers(5, vocab, 3)),
                          positive_docs=positives))
  return samples


def make_batch(samples, msa_cfg, *, seq_len_mem=48, seq_len_prompt=16, max_docs=6):
  memory, prompt = build_batch(samples, seq_len_mem=seq_len_mem, seq_len_prompt=seq_len_prompt,
                               max_docs=max_docs, chunk_size=msa_cfg.chunk_size,
                               question_position=msa_cfg.question_position, pad_id=0)
  return jax.tree.map(jnp.asarray, memory), jax.tree.map(jnp.asarray, prompt)

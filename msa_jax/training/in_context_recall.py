"""The isolated copy diagnosis: the plain backbone (no memory) trained on fact lookup
with the gold document's text simply in context.

A sample is `[0]. <gold card>\\n<question>\\nThe answer to the question is: <value>` (optionally
with distractor cards before it), tokenized with the world tokenizer. The loss is on the answer's
tokens only (`dense=False`) or on every next token (`dense=True`). Held-out accuracy is measured
on the first answer token. If this backbone learns to copy and the MSA model with the same
documents injected in its prompt does not, the obstacle is in MSA's prompt stream or its training
mix, not in the task or the optimiser.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from msa_jax import config as cfglib
from msa_jax.data import prompt_format as pf
from msa_jax.data.batch import plain_prompt
from msa_jax.data.synthetic import tasks
from msa_jax.data.synthetic.world_tokenizer import world_tokenizer
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training import losses


@dataclasses.dataclass(frozen=True)
class RecallSettings:
  hidden_size: int = 128
  num_layers: int = 6
  embedding_init_std: float = 1.0
  peak_lr: float = 2e-3
  steps: int = 3000
  batch_size: int = 32
  num_docs: int = 1  # the gold card plus num_docs - 1 distractor cards
  max_doc_tokens: int = 64
  seq_len: int = 256
  dense: bool = False
  eval_every: int = 100
  eval_size: int = 64
  seed: int = 0

  def __post_init__(self):
    for name in ("hidden_size", "num_layers", "steps", "batch_size", "num_docs", "seq_len",
                 "eval_every", "eval_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"RecallSettings.{name} must be positive, got {getattr(self, name)}")
    if self.hidden_size % 32:
      raise ValueError(f"hidden_size must be a multiple of 32 (head_dim), got {self.hidden_size}")


@dataclasses.dataclass(frozen=True)
class RecallSample:
  tokens: list[int]
  labels: list[int]  # labels[p] is the token at p+1 where scored, else -1
  answer_at: int  # the position whose label is the answer's first token


def recall_sample(tokenizer, seed: int, index: int, s: RecallSettings) -> RecallSample:
  """Record `index` of fact lookup as an in-context sample; only the answer's tokens are scored
  unless `s.dense`."""
  record = tasks.fact_lookup(seed, index, memory_tokens=1 << 30, min_doc_tokens=16,
                             max_doc_tokens=s.max_doc_tokens, max_docs=s.num_docs)
  context = "".join(f"[{i}]. {d}\n" for i, d in enumerate(record.documents))
  prefix = list(tokenizer.encode(context + record.question + "\n" + pf.ANSWER_PREFIX.rstrip()))
  ids = prefix + list(tokenizer.encode(" " + record.answer))
  if len(ids) > s.seq_len:
    raise ValueError(f"record {index} takes {len(ids)} tokens, more than seq_len={s.seq_len}")
  answer_at = len(prefix) - 1
  first = 0 if s.dense else answer_at
  labels = [-1] * len(ids)
  labels[first:len(ids) - 1] = ids[first + 1:]
  return RecallSample(ids, labels, answer_at)


def make_batch(tokenizer, seed: int, start: int, size: int, s: RecallSettings):
  """(tokens, labels, segment_ids, answer_at) arrays of samples start..start+size-1."""
  tokens = np.zeros((size, s.seq_len), np.int32)
  labels = np.full((size, s.seq_len), -1, np.int32)
  segments = np.zeros((size, s.seq_len), np.int32)
  answer_at = np.zeros((size,), np.int32)
  for b in range(size):
    x = recall_sample(tokenizer, seed, start + b, s)
    n = len(x.tokens)
    tokens[b, :n], labels[b, :n], segments[b, :n], answer_at[b] = x.tokens, x.labels, 1, x.answer_at
  return tokens, labels, segments, answer_at


def backbone(s: RecallSettings, vocab_size: int) -> MSAForCausalLM:
  """The tiny_msa shape family without router layers: exactly a Qwen3 decoder."""
  model_cfg = cfglib.ModelConfig(
      vocab_size=-(-vocab_size // 64) * 64, hidden_size=s.hidden_size,
      intermediate_size=3 * s.hidden_size, num_layers=s.num_layers,
      num_heads=max(4, s.hidden_size // 32), num_kv_heads=max(2, s.hidden_size // 64), head_dim=32,
      rope_theta=10_000.0, compute_dtype="float32", embedding_init_std=s.embedding_init_std,
      max_position_embeddings=max(4096, s.seq_len))
  return MSAForCausalLM(model_cfg, cfglib.MSAConfig(router_layers=()))


def train(s: RecallSettings, log: Callable[[str], None] = print) -> dict:
  """Trains the backbone; returns the curve {steps, loss, heldout_accuracy} and the settings."""
  tokenizer = world_tokenizer()
  model = backbone(s, tokenizer.vocab_size)

  def hidden_and_kernel(params, tokens, segments):
    prompt = plain_prompt(tokens, segment_ids=segments)
    return model.apply({"params": params}, method=lambda m: (m(prompt, None).hidden,
                                                             m.lm_kernel()))

  def loss_fn(params, tokens, labels, segments):
    hidden, kernel = hidden_and_kernel(params, tokens, segments)
    return losses.mean_cross_entropy(hidden, kernel, labels, 1024)

  schedule = optax.warmup_cosine_decay_schedule(0.0, s.peak_lr, min(100, s.steps // 4), s.steps,
                                                s.peak_lr / 10)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95,
                                                                weight_decay=0.0))

  @jax.jit
  def step(params, opt_state, tokens, labels, segments):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, labels, segments)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params, tokens, labels, segments, answer_at):
    hidden, kernel = hidden_and_kernel(params, tokens, segments)
    rows = jnp.arange(tokens.shape[0])
    logits = hidden[rows, answer_at].astype(jnp.float32) @ kernel.astype(jnp.float32)
    return jnp.mean(jnp.argmax(logits, -1) == labels[rows, answer_at])

  held_out = make_batch(tokenizer, s.seed + 1_000_003, 0, s.eval_size, s)
  first = make_batch(tokenizer, s.seed, 0, s.batch_size, s)
  params = nn.unbox(model.init(jax.random.key(s.seed), plain_prompt(first[0], segment_ids=first[2]),
                               None)["params"])
  opt_state = opt.init(params)
  curve = {"steps": [], "loss": [], "heldout_accuracy": []}
  start = time.time()
  for i in range(1, s.steps + 1):
    tokens, labels, segments, _ = make_batch(tokenizer, s.seed, i * s.batch_size, s.batch_size, s)
    params, opt_state, loss = step(params, opt_state, tokens, labels, segments)
    if i % s.eval_every == 0 or i == s.steps:
      acc = float(accuracy(params, *held_out))
      curve["steps"].append(i)
      curve["loss"].append(float(loss))
      curve["heldout_accuracy"].append(acc)
      rate = i / (time.time() - start)
      log(f"step {i}/{s.steps} loss {float(loss):.3f} held-out answer accuracy {acc:.3f} | "
          f"{rate:.1f} steps/s, ETA {(s.steps - i) / rate:.0f}s")
  return {"settings": dataclasses.asdict(s), **curve}


def chart(report: dict, path: str) -> None:
  """Held-out answer accuracy against step."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(report["steps"], report["heldout_accuracy"], marker="o")
  ax.set(xlabel="step", ylabel="held-out answer accuracy", ylim=(0, 1.02),
         title="in-context recall, plain backbone (" + ("dense" if report["settings"]["dense"]
                                                       else "answer-only") + " loss)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)

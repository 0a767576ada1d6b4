"""The generation engine: batched prefill (stage 2) and KV-cached decode (stage 3) over a memory.

    engine = Engine(model, params, encoded.view)          # or a memory bank's view
    out = engine.generate([Request(tokens, route_mask, max_new_tokens=32, stop_ids=(im_end,))],
                          SamplingConfig(temperature=0.0))

Prefill runs the model's prompt path unchanged (per router layer route -> gather -> attention over
[selected chunks | prompt], the template head being the prompt's memory-blind first tokens) and
keeps every key it attended in a preallocated cache (`kv_cache`); decoding appends tokens there, so
memory is routed once per prefill, as in the official stage 3 (MSA_REFERENCE_IMPL.md §3.3). The
whole decode loop is one `lax.while_loop` on the device: no host round trip per token.

Bucket policy (bounds recompilation: one prefill and one decode program per bucket combination):
- prompt length: the next power of two >= max(16, longest prompt of the batch), capped at
  `max_prompt_len` (itself a bucket); longer prompts are refused;
- batch: the next power of two >= the number of requests, or `max_batch` if smaller; more requests
  run in successive batches, grouped by prompt length; padding rows repeat a real row and are
  discarded;
- new tokens: the next power of two >= max(8, largest `max_new_tokens` of the batch);
- stop ids: the next power of two >= max(4, most stop ids of a request).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from msa_jax.data.batch import PromptBatch, plain_prompt
from msa_jax.data.batch_builder import as_token_ids, bucket_length, build_generation_prompts
from msa_jax.inference import kv_cache, sampling
from msa_jax.inference.requests import Generation, LayerRouting, Request, SamplingConfig
from msa_jax.model.model import MSAForCausalLM
from msa_jax.model.param_layout import unstack_layers

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 8
MIN_STOP_BUCKET = 4


class EngineError(ValueError):
  """A request, or the model/view pairing, cannot be served."""


def power_of_two_buckets(minimum: int, cap: int) -> list[int]:
  """minimum, 2·minimum, … below `cap`, then `cap`."""
  out, b = [], minimum
  while b < cap:
    out.append(b)
    b *= 2
  return out + [cap]


def next_power_of_two(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@flax.struct.dataclass
class DecodeState:
  """A batch mid-generation: one `kv_cache.LayerCache` per layer, the logits [B, V] (float32) after
  each row's last token, and the RoPE position [B] its next token takes."""

  caches: list
  logits: jax.Array
  next_position: jax.Array


# --------------------------------------------------------------------------- device programs


def _prefill(model: MSAForCausalLM, params, prompt: PromptBatch, view, *, budget: int):
  """(DecodeState with `budget` free slots per layer, the view's selection stacked per router layer)."""
  b, s = prompt.tokens.shape
  last = jnp.sum(prompt.segment_ids, axis=1) - 1
  rows = jnp.arange(b)

  def run(module, prompt, view):
    out = module.prefill(prompt, view)
    return module.logits(out.hidden[rows, last][:, None])[:, 0], out

  view = None if view is None else view.for_batch(b)
  logits, out = model.apply({"params": params}, prompt, view, method=run)
  caches = [kv_cache.from_prefill(kv, s, budget) for kv in out.kv]
  state = DecodeState(caches, logits.astype(jnp.float32), prompt.positions[rows, last] + 1)
  return state, out.selection


def _append(model: MSAForCausalLM, params, state: DecodeState, tokens, valid) -> DecodeState:
  """Feeds tokens [B, n] (`valid` [B, n]: a prefix of each row) through the cache: they attend
  causally among themselves and to everything before; positions continue per row."""
  valid = valid.astype(jnp.int32)
  positions = state.next_position[:, None] + jnp.cumsum(valid, axis=1) - 1
  count = jnp.sum(valid, axis=1)
  rows = jnp.arange(tokens.shape[0])

  def run(module, prompt, caches):
    out = module.decode_step(prompt, caches)
    last = out.hidden[rows, jnp.maximum(count - 1, 0)]
    return module.logits(last[:, None])[:, 0], out.caches

  logits, caches = model.apply({"params": params}, plain_prompt(tokens, positions, valid),
                               state.caches, method=run)
  logits = jnp.where((count > 0)[:, None], logits.astype(jnp.float32), state.logits)
  return DecodeState(caches, logits, state.next_position + count)


def _decode(model: MSAForCausalLM, params, state: DecodeState, stop_ids, max_new, active, row_ids,
            key, temperature, top_p, *, greedy: bool, steps: int):
  """Samples up to `steps` tokens per row in one `lax.while_loop`; a row stops at one of its
  `stop_ids` [B, K] (-1 = none) or after `max_new` [B] tokens; inactive rows (padding) never run.
  Returns (tokens [B, steps] (-1 after a row's end), counts [B], stopped [B], final state)."""
  b = stop_ids.shape[0]

  def pick(logits, step):
    return sampling.next_tokens(logits, greedy=greedy, temperature=temperature, top_p=top_p,
                                key=key, row_ids=row_ids, step=step)

  def record(out, count, done, stopped, token, step):
    out = out.at[:, step].set(jnp.where(done, -1, token))
    count = count + (~done).astype(jnp.int32)
    hit = ~done & jnp.any(token[:, None] == stop_ids, axis=1)
    return out, count, done | hit | (count >= max_new), stopped | hit

  token = pick(state.logits, 0)
  out, count, done, stopped = record(jnp.full((b, steps), -1, jnp.int32), jnp.zeros(b, jnp.int32),
                                     ~active, jnp.zeros(b, bool), token, 0)

  def cond(carry):
    step, _, _, _, _, done, _ = carry
    return (step < steps) & ~jnp.all(done)

  def body(carry):
    step, state, token, out, count, done, stopped = carry
    state = _append(model, params, state, token[:, None], jnp.ones((b, 1), bool))
    token = pick(state.logits, step)
    out, count, done, stopped = record(out, count, done, stopped, token, step)
    return step + 1, state, token, out, count, done, stopped

  _, state, _, out, count, _, stopped = jax.lax.while_loop(
      cond, body, (jnp.int32(1), state, token, out, count, done, stopped))
  return out, count, stopped, state


# compiled programs are shared by every engine of one model (the model is a static argument)
_prefill_jit = jax.jit(_prefill, static_argnums=0, static_argnames=("budget",))
_append_jit = jax.jit(_append, static_argnums=0, donate_argnames=("state",))
_decode_jit = jax.jit(_decode, static_argnums=0, static_argnames=("greedy", "steps"),
                      donate_argnames=("state",))


# --------------------------------------------------------------------------- the engine


class Engine:
  """Serves `Request`s against one memory: `view` is an in-memory `MemoryView` of one memory row
  (`entry_points.encode_memory`) or any view with the same protocol (the memory bank): route /
  gather per layer, `for_batch(b)` and `serving_problem(config)`; None for a model without
  router layers. Prompts take the training layout: the template head at 0..T-1, memory-blind,
  the rest from the question position on, seeing memory.

  `backbone=True` serves without any memory (no view): plain prompts at positions 0..n-1 that
  route nowhere, router layers attending to the prompt only, so the model is its Qwen3 backbone
  (a converted checkpoint without a bank, the quick start).

  `max_batch` rows run together; `max_prompt_len` (default: what the model's positions allow) caps
  the prompt bucket. A model in the scanned layout is served in the per-layer one (same params).
  """

  def __init__(self, model: MSAForCausalLM, params, view=None, *, max_batch: int = 16,
               max_prompt_len: int | None = None, backbone: bool = False):
    c, m = model.config, model.msa
    if backbone:
      if view is not None:
        raise EngineError("a backbone engine serves without memory; it takes no view")
      head, position_room = 0, c.max_position_embeddings
    else:
      _check_view(view, model)
      head = m.template_len
      position_room = c.max_position_embeddings - m.question_position + m.template_len
    cap = position_room if max_prompt_len is None else max_prompt_len
    if max_batch < 1 or cap <= head:
      raise EngineError(f"max_batch must be >= 1 and max_prompt_len > the template head "
                        f"({head}); got {max_batch}, {cap}")
    self.model = model.clone(config=c.replace(scan_layers=False, remat_policy="none"))
    self.params = unstack_layers(params) if c.scan_layers else params
    self.view = view
    self.backbone = backbone
    self.max_batch = max_batch
    self.max_prompt_len = cap
    self.prompt_buckets = power_of_two_buckets(min(MIN_PROMPT_BUCKET, cap), cap)

  # ------------------------------------------------------------------ checks and host-side batches

  def check_request(self, i: int, request: Request) -> None:
    """Raises EngineError naming request `i` and its problem."""
    c, m = self.model.config, self.model.msa
    tokens = as_token_ids(request.tokens, f"request {i}: tokens", c.vocab_size, EngineError)
    as_token_ids(list(request.stop_ids), f"request {i}: stop_ids", c.vocab_size, EngineError)
    n = tokens.size
    if n == 0:
      raise EngineError(f"request {i}: empty prompt")
    if len(request.route_mask) != n:
      raise EngineError(f"request {i}: route_mask has {len(request.route_mask)} entries but the "
                        f"prompt has {n} tokens")
    if n > self.max_prompt_len:
      raise EngineError(f"request {i}: prompt of {n} tokens is longer than the limit "
                        f"{self.max_prompt_len} (max_prompt_len / the model's positions)")
    if self.backbone:
      last = n + request.max_new_tokens - 1
    else:
      self._check_memory_request(i, request, n)
      last = m.question_position + (n - m.template_len) + request.max_new_tokens - 1
    if request.max_new_tokens < 1:
      raise EngineError(f"request {i}: max_new_tokens must be >= 1, got {request.max_new_tokens}")
    if last >= c.max_position_embeddings:
      raise EngineError(f"request {i}: prompt ({n} tokens) plus max_new_tokens "
                        f"({request.max_new_tokens}) reach position {last}, beyond the model's "
                        f"max_position_embeddings ({c.max_position_embeddings})")

  def _check_memory_request(self, i: int, request: Request, n: int) -> None:
    """What a request over memory needs: tokens past the template head, and route tokens."""
    m = self.model.msa
    if n <= m.template_len:
      raise EngineError(f"request {i}: {n} tokens, not more than the memory-blind template head "
                        f"({m.template_len} tokens): nothing would see the memory")
    if m.router_layers and not any(request.route_mask):
      raise EngineError(f"request {i}: route_mask selects no token, so nothing scores the memory")

  def _prompt_batch(self, requests: Sequence[Request]) -> PromptBatch:
    """Rows in the training layout (`batch_builder`'s; plain rows for a backbone engine), padded
    to the prompt and batch buckets (extra rows repeat row 0)."""
    m = self.model.msa
    s = bucket_length(max(len(r.tokens) for r in requests), self.prompt_buckets)
    b = min(next_power_of_two(len(requests)), self.max_batch)
    rows = [(r.tokens, r.route_mask) for r in list(requests) + [requests[0]] * (b - len(requests))]
    return build_generation_prompts(rows, seq_len_prompt=s,
                                    template_len=None if self.backbone else m.template_len,
                                    question_position=m.question_position)

  # ------------------------------------------------------------------ the API

  def prefill(self, requests: Sequence[Request], budget: int | None = None
              ) -> tuple[DecodeState, list[list[LayerRouting]]]:
    """Stage 2 for at most `max_batch` requests: the decode state (rows padded to the batch bucket,
    `budget` free cache slots, default the new-tokens bucket) and each request's routing."""
    if not requests:
      raise EngineError("no requests")
    if len(requests) > self.max_batch:
      raise EngineError(f"{len(requests)} requests in one prefill; at most max_batch="
                        f"{self.max_batch} (generate() splits larger lists)")
    for i, r in enumerate(requests):
      self.check_request(i, r)
    if budget is None:
      budget = next_power_of_two(max(r.max_new_tokens for r in requests), MIN_NEW_TOKENS_BUCKET)
    state, selection = _prefill_jit(self.model, self.params, self._prompt_batch(requests),
                                    self.view, budget=budget)
    return state, _routing(jax.device_get(selection), self.model.msa.router_layers, len(requests))

  def append(self, state: DecodeState, tokens: Sequence[Sequence[int]]) -> DecodeState:
    """Appends each row's `tokens` (rows of different lengths allowed, any may be empty) at once;
    `state` is consumed. Raises if the cache has no room."""
    b = state.next_position.shape[0]
    if len(tokens) > b:
      raise EngineError(f"{len(tokens)} token rows for a batch of {b}")
    n = max([len(t) for t in tokens] + [1])
    room = int(kv_cache.free_slots(state.caches))
    if n > room:
      raise EngineError(f"appending {n} tokens, but the cache has room for {room}")
    ids = np.zeros((b, n), np.int32)
    valid = np.zeros((b, n), bool)
    for i, t in enumerate(tokens):
      ids[i, :len(t)] = as_token_ids(list(t), f"request {i}: appended tokens",
                                     self.model.config.vocab_size, EngineError)
      valid[i, :len(t)] = True
    return _append_jit(self.model, self.params, state, jnp.asarray(ids), jnp.asarray(valid))

  def decode(self, state: DecodeState, requests: Sequence[Request], sampling_cfg: SamplingConfig,
             row_ids: Sequence[int] | None = None):
    """Stage 3 from `state` (consumed) for the rows of `requests` (padding rows beyond them are
    skipped): (tokens per request, stopped per request, the final state)."""
    b = state.next_position.shape[0]
    steps = next_power_of_two(max(r.max_new_tokens for r in requests), MIN_NEW_TOKENS_BUCKET)
    room = int(kv_cache.free_slots(state.caches))
    if steps - 1 > room:
      raise EngineError(f"decoding up to {steps} tokens needs {steps - 1} free cache slots; the "
                        f"cache has {room}")
    width = next_power_of_two(max([len(r.stop_ids) for r in requests] + [1]), MIN_STOP_BUCKET)
    stop = np.full((b, width), -1, np.int32)
    max_new = np.zeros(b, np.int32)
    for i, r in enumerate(requests):
      stop[i, :len(r.stop_ids)] = r.stop_ids
      max_new[i] = r.max_new_tokens
    rows = np.arange(b) if row_ids is None else np.pad(np.asarray(row_ids), (0, b - len(row_ids)))
    if sampling_cfg.temperature < 0 or not 0 < sampling_cfg.top_p <= 1:
      raise EngineError(f"temperature must be >= 0 and top_p in (0, 1], got "
                        f"{sampling_cfg.temperature}, {sampling_cfg.top_p}")
    greedy = sampling_cfg.temperature == 0
    out, count, stopped, state = _decode_jit(
        self.model, self.params, state, jnp.asarray(stop), jnp.asarray(max_new),
        jnp.asarray(np.arange(b) < len(requests)), jnp.asarray(rows, jnp.int32),
        jax.random.key(sampling_cfg.seed), jnp.float32(sampling_cfg.temperature or 1.0),
        jnp.float32(sampling_cfg.top_p), greedy=greedy, steps=steps)
    out, count, stopped = jax.device_get((out, count, stopped))
    tokens = [out[i, :count[i]].tolist() for i in range(len(requests))]
    return tokens, [bool(s) for s in stopped[:len(requests)]], state

  def generate(self, requests: Sequence[Request],
               sampling_cfg: SamplingConfig = SamplingConfig()) -> list[Generation]:
    """One `Generation` per request, in order. Requests run in batches of up to `max_batch`,
    grouped by prompt length; a request's tokens do not depend on the others."""
    if not requests:
      raise EngineError("no requests")
    for i, r in enumerate(requests):
      self.check_request(i, r)
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].tokens))
    results: list[Any] = [None] * len(requests)
    for start in range(0, len(order), self.max_batch):
      group = order[start:start + self.max_batch]
      batch = [requests[i] for i in group]
      state, routing = self.prefill(batch)
      tokens, stopped, _ = self.decode(state, batch, sampling_cfg, row_ids=group)
      for j, i in enumerate(group):
        results[i] = Generation(tokens=tokens[j], stopped=stopped[j], routing=routing[j])
    return results


def _check_view(view, model: MSAForCausalLM) -> None:
  """The view must hold the model's router layers (else it was built by another model)."""
  routers = model.msa.router_layers
  if view is None:
    if routers:
      raise EngineError(f"the model routes at layers {routers}; it needs a memory view")
    return
  held = tuple(view.router_layers)
  if held != routers:
    raise EngineError(f"the memory view holds router layers {held} but the model routes at "
                      f"{routers}: was it built by another model?")
  problem = view.serving_problem(model.config)
  if problem:
    raise EngineError(problem)


def _routing(selection, router_layers, n: int) -> list[list[LayerRouting]]:
  """Per request, per router layer: the selected documents best first, with their scores, from
  the view's selection stacked per router layer (`router.Selection`, [L_r, B, k]; None: no
  routing, without memory or router layers)."""
  out = [[] for _ in range(n)]
  if selection is None:
    return out
  for r, layer in enumerate(router_layers):
    index, scores, valid = (np.asarray(x[r]) for x in (selection.doc_index, selection.scores,
                                                        selection.valid))
    for b in range(n):
      out[b].append(LayerRouting(layer=layer, doc_index=index[b][valid[b]].astype(np.int64),
                                 scores=scores[b][valid[b]].astype(np.float32)))
  return out

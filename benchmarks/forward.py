"""Throughput benchmark of the MSA training forward and forward+backward with random weights.

`run_benchmark(BenchSettings(...))` builds a random batch whose memory rows are filled with documents
of `doc_len` tokens, initialises random parameters directly on the device (one jitted `model.init` on
a tiny dummy batch: parameter shapes do not depend on sequence lengths, so nothing of the real batch
is traced twice and no parameter passes through the host), then for each mode compiles (AOT), warms
up and times `steps` calls with `block_until_ready`:

  forward  `loss_and_metrics` (LM + aux loss) evaluated without gradients
  train    `jax.value_and_grad(loss_and_metrics)` with respect to all parameters (grads returned)

A mode that runs out of device memory is recorded as "OOM" and the next mode still runs.

Model FLOPs (`model_flops`, for MFU) count matrix multiplications only (norms, RoPE, softmax,
pooling means and the loss are left out) and only the work the algorithm needs, not what the
implementation happens to do (it scores every chunk slot and masks; that is not counted):

  forward = 2 · Σ (matmul parameters applied to a token), per stream:
            every layer's q/k/v/o + SwiGLU MLP on every memory and prompt token;
            router layers: router_k on memory tokens, router_q on route (question) tokens;
            the LM head (E·V) on every prompt token; the embedding lookup costs nothing
          + attention, 4·H·D per (query, key) pair per layer (QKᵀ and PV):
            memory stream, causal within each document, every layer: Σ_docs L(L+1)/2 pairs
            prompt stream, causal over the prompt, every layer: S_q(S_q+1)/2 pairs
            router layers: memory-seeing prompt tokens (all but the template head) × selected chunks
            (the top-k documents, the longest ones when lengths differ, ⌈L/P⌉ chunks each)
          + routing scores, per router layer: route tokens × real chunks × 2·D·Hkv (head mean: query
            heads are summed per KV group first) or 2·D·H (head max)
  train   = 3 · forward (the backward pass is twice the forward; recomputation under remat is not
            model work and is not counted)

This is "2·N·tokens / 6·N·tokens on the dense parts" with N split by which tokens each matrix sees.
MFU = model FLOPs per step / median step time / the device's dense bf16 peak (`common.PEAK_BF16_FLOPS`).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import statistics
import time
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (BenchError, count_params, is_oom, memory_stats, peak_bf16_flops,
                               tree_bytes)
from msa_jax import config as cfglib
from msa_jax.config import ModelConfig, MSAConfig
from msa_jax.data.batch_builder import Sample, build_batch
from msa_jax.model.model import MSAForCausalLM
from msa_jax.atomic_dir import write_json_and_chart
from msa_jax.training.objective import loss_and_metrics

MODES = ("forward", "train")


@dataclasses.dataclass(frozen=True)
class BenchSettings:
  """What to benchmark (the binary's flags)."""

  preset: str = "tiny"
  seq_len_mem: int = 16384
  doc_len: int = 1024
  seq_len_prompt: int = 512
  batch: int = 1
  steps: int = 10
  warmup: int = 2
  remat: str = "none"
  scan_layers: bool = False
  param_dtype: str = "bfloat16"
  modes: tuple[str, ...] = MODES
  question_len: int = 64
  attention_impl: str = "blockwise"
  ce_chunk_size: int = 1024
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "modes", tuple(self.modes))
    for name in ("seq_len_mem", "doc_len", "seq_len_prompt", "batch", "steps", "question_len",
                 "ce_chunk_size"):
      if getattr(self, name) <= 0:
        raise BenchError(f"{name} must be positive, got {getattr(self, name)}")
    if self.warmup < 0:
      raise BenchError(f"warmup must be >= 0, got {self.warmup}")
    if self.doc_len > self.seq_len_mem:
      raise BenchError(f"doc_len ({self.doc_len}) is longer than a memory row "
                       f"(seq_len_mem={self.seq_len_mem})")
    if self.remat not in cfglib.REMAT_POLICIES:
      raise BenchError(f"remat must be one of {cfglib.REMAT_POLICIES}, got {self.remat!r}")
    if self.param_dtype not in cfglib.DTYPES:
      raise BenchError(f"param_dtype must be one of {cfglib.DTYPES}, got {self.param_dtype!r}")
    bad = [m for m in self.modes if m not in MODES]
    if bad or not self.modes:
      raise BenchError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")


@dataclasses.dataclass(frozen=True)
class Workload:
  """The token layout of one step: every memory row holds the same documents."""

  batch: int
  doc_lengths: tuple[int, ...]
  seq_len_prompt: int
  template_len: int  # the prompt's memory-blind head
  question_len: int  # route tokens

  @property
  def seq_len_mem(self) -> int:
    return sum(self.doc_lengths)

  @property
  def tokens_per_step(self) -> int:
    return self.batch * (self.seq_len_mem + self.seq_len_prompt)


def make_workload(settings: BenchSettings, msa: MSAConfig) -> Workload:
  """Documents of `doc_len` fill each memory row (a shorter last one takes the remainder); the
  prompt is [template head][question][answer] filling `seq_len_prompt`."""
  full, rest = divmod(settings.seq_len_mem, settings.doc_len)
  docs = (settings.doc_len,) * full + ((rest,) if rest else ())
  head = msa.template_len
  if settings.seq_len_prompt < head + 2:
    raise BenchError(f"seq_len_prompt must be at least {head + 2} (template head {head}, one "
                     f"question and one answer token), got {settings.seq_len_prompt}")
  question = min(settings.question_len, max(1, (settings.seq_len_prompt - head) // 2))
  return Workload(settings.batch, docs, settings.seq_len_prompt, head, question)


def model_configs(settings: BenchSettings) -> tuple[ModelConfig, MSAConfig]:
  model_cfg, msa_cfg = cfglib.preset(settings.preset)
  model_cfg = model_cfg.replace(param_dtype=settings.param_dtype, compute_dtype="bfloat16",
                                remat_policy=settings.remat, scan_layers=settings.scan_layers)
  return model_cfg, msa_cfg.validate_for(model_cfg)


# --------------------------------------------------------------------------- model FLOPs


def model_flops(model: ModelConfig, msa: MSAConfig, work: Workload, mode: str) -> dict[str, float]:
  """Model FLOPs of one step by part (see the module docstring); "total" sums them."""
  if mode not in MODES:
    raise BenchError(f"unknown mode {mode!r}")
  e, f, h, hkv, d = (model.hidden_size, model.intermediate_size, model.num_heads,
                     model.num_kv_heads, model.head_dim)
  n_layers, n_router = model.num_layers, len(msa.router_layers)
  mem_tokens, prompt_tokens = work.seq_len_mem, work.seq_len_prompt
  layer_params = e * h * d + 2 * e * hkv * d + h * d * e + 3 * e * f  # q, k, v, o, gate/up/down
  router_q = e * h * d if msa.decouple_router else 0
  router_k = e * hkv * d if msa.decouple_router else 0
  pair = 4 * h * d  # one (query, key) pair of one layer: QKᵀ and PV, all query heads

  mem_pairs = sum(n * (n + 1) // 2 for n in work.doc_lengths)
  prompt_pairs = prompt_tokens * (prompt_tokens + 1) // 2
  chunks = sorted((-(-n // msa.chunk_size) for n in work.doc_lengths), reverse=True)
  selected_chunks = sum(chunks[:min(msa.top_k_docs, len(chunks))])
  seeing = prompt_tokens - work.template_len
  score_width = hkv * d if msa.head_reduce == "mean" else h * d

  per_row = {
      "dense_memory": 2.0 * mem_tokens * (n_layers * layer_params + n_router * router_k),
      "dense_prompt": 2.0 * (prompt_tokens * n_layers * layer_params +
                             work.question_len * n_router * router_q),
      "lm_head": 2.0 * prompt_tokens * e * model.vocab_size,
      "attention_memory": float(pair * mem_pairs * n_layers),
      "attention_prompt": float(pair * (prompt_pairs * n_layers +
                                        seeing * selected_chunks * n_router)),
      "routing": 2.0 * work.question_len * sum(chunks) * score_width * n_router,
  }
  scale = work.batch * (3.0 if mode == "train" else 1.0)
  out = {k: v * scale for k, v in per_row.items()}
  out["total"] = sum(out.values())
  return out


# --------------------------------------------------------------------------- batch and parameters


def _samples(rng: np.random.Generator, work: Workload, vocab: int, n: int) -> list[Sample]:
  low = min(5, vocab - 1)
  answer = work.seq_len_prompt - work.template_len - work.question_len
  out = []
  for _ in range(n):
    docs = [rng.integers(low, vocab, size) for size in work.doc_lengths]
    positives = sorted(rng.choice(len(docs), size=min(2, len(docs)), replace=False).tolist())
    out.append(Sample(documents=docs, template_head=rng.integers(low, vocab, work.template_len),
                      question=rng.integers(low, vocab, work.question_len),
                      answer=rng.integers(low, vocab, answer), positive_docs=positives))
  return out


def build_inputs(model: ModelConfig, msa: MSAConfig, work: Workload, seed: int = 0, *,
                 batch: int | None = None):
  """Random (MemoryBatch, PromptBatch) on the default device; `batch` overrides `work.batch`."""
  samples = _samples(np.random.default_rng(seed), work, model.vocab_size,
                     work.batch if batch is None else batch)
  memory, prompt = build_batch(samples, seq_len_mem=work.seq_len_mem,
                               seq_len_prompt=work.seq_len_prompt, max_docs=len(work.doc_lengths),
                               chunk_size=msa.chunk_size, question_position=msa.question_position,
                               pad_id=0, vocab_size=model.vocab_size)
  return jax.device_put(memory), jax.device_put(prompt)


def init_params(model: MSAForCausalLM, seed: int = 0):
  """Random parameters created on the device by one jitted init over a tiny dummy batch (parameter
  shapes do not depend on sequence lengths). Returns (params, abstract params)."""
  c, m = model.config, model.msa
  dummy = Workload(1, (m.chunk_size,), m.template_len + 2, m.template_len, 1)
  memory, prompt = build_inputs(c, m, dummy, seed, batch=1)
  init = jax.jit(lambda key: nn.unbox(model.init(key, prompt, memory)["params"]))
  key = jax.random.key(seed)
  abstract = jax.eval_shape(init, key)
  return init(key), abstract


# --------------------------------------------------------------------------- timing


def step_function(model: MSAForCausalLM, mode: str, ce_chunk_size: int) -> Callable:
  """The jitted step of a mode: (params, memory, prompt) -> outputs."""

  def loss(params, memory, prompt):
    return loss_and_metrics(params, model, memory, prompt, ce_chunk_size=ce_chunk_size)

  if mode == "forward":
    return jax.jit(loss)
  if mode == "train":
    return jax.jit(jax.value_and_grad(loss, has_aux=True))
  raise BenchError(f"unknown mode {mode!r}")


def _compiled_memory(compiled) -> dict[str, int] | None:
  """XLA's own estimate for the program: arguments, outputs, temporaries (works on CPU too)."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if analysis is None:
    return None
  out = {}
  for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
               "alias_size_in_bytes", "generated_code_size_in_bytes"):
    value = getattr(analysis, name, None)
    if value is not None:
      out[name] = int(value)
  return out or None


def time_mode(fn: Callable, args: Sequence[Any], *, steps: int, warmup: int,
              progress: Callable[[str], None], label: str,
              info: dict[str, Any] | None = None) -> dict[str, Any]:
  """Compiles `fn` ahead of time, runs `warmup` untimed calls, then times `steps` calls. `info`
  receives compile_s and compiled_memory as soon as they are known (kept when a run then fails)."""
  info = {} if info is None else info
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  info.update(compile_s=compile_s, compiled_memory=_compiled_memory(compiled))
  progress(f"[{label}] compiled in {compile_s:.2f} s")
  out = None
  for i in range(warmup):
    out = None  # drop the previous outputs (a train step's grads) before the next call
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    progress(f"[{label}] warmup {i + 1}/{warmup}: {time.perf_counter() - t0:.4f} s")
  times = []
  report_every = max(1, steps // 10)
  for i in range(steps):
    out = None
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
    if (i + 1) % report_every == 0 or i + 1 == steps:
      progress(f"[{label}] step {i + 1}/{steps}: {times[-1]:.4f} s")
  loss = float(jax.tree.leaves(out)[0]) if out is not None else None
  del out
  return {"compile_s": compile_s, "step_times_s": times, "loss": loss,
          "compiled_memory": info["compiled_memory"]}


# --------------------------------------------------------------------------- the benchmark


def _progress_print(line: str) -> None:
  print(line, flush=True)


def run_benchmark(settings: BenchSettings,
                  progress: Callable[[str], None] = _progress_print) -> dict[str, Any]:
  """Runs every mode of `settings`; returns the report (what `write_report` saves)."""
  model_cfg, msa_cfg = model_configs(settings)
  work = make_workload(settings, msa_cfg)
  device = jax.devices()[0]
  peak = peak_bf16_flops(device.device_kind)
  model = MSAForCausalLM(model_cfg, msa_cfg, attention_impl=settings.attention_impl)
  report: dict[str, Any] = {
      "device_kind": device.device_kind, "platform": device.platform,
      "num_devices": jax.device_count(), "jax_version": jax.__version__,
      "flax_version": getattr(flax, "__version__", None),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "flags": dataclasses.asdict(settings),
      "config": cfglib.config_to_dict(model_cfg, msa_cfg),
      "workload": {"batch": work.batch, "num_docs": len(work.doc_lengths),
                   "doc_lengths": sorted(set(work.doc_lengths), reverse=True),
                   "seq_len_mem": work.seq_len_mem, "seq_len_prompt": work.seq_len_prompt,
                   "template_len": work.template_len, "question_len": work.question_len,
                   "tokens_per_step": work.tokens_per_step},
      "num_params": None, "param_bytes": None,
      "peak_bf16_flops": peak,
      "results": {},
  }
  progress(f"device {device.device_kind} ({device.platform}), jax {jax.__version__}; preset "
           f"{settings.preset}, batch {work.batch}, {len(work.doc_lengths)} docs x "
           f"{settings.doc_len} = {work.seq_len_mem} memory + {work.seq_len_prompt} prompt tokens "
           f"per row")
  t0 = time.perf_counter()
  try:
    params, abstract = init_params(model, settings.seed)
    params = jax.block_until_ready(params)
    memory, prompt = build_inputs(model_cfg, msa_cfg, work, settings.seed)
  except Exception as e:  # noqa: BLE001 - an OOM here fails every mode
    if not is_oom(e):
      raise
    progress(f"OOM while initialising parameters: {str(e)[:200]}")
    for mode in settings.modes:
      report["results"][mode] = {"status": "OOM", "error": str(e)[:2000]}
    return report
  n_params = count_params(abstract)
  report["num_params"] = n_params
  report["param_bytes"] = tree_bytes(abstract)
  progress(f"initialised {n_params / 1e6:.2f}M parameters ({report['param_bytes'] / 2**30:.2f} GiB "
           f"{settings.param_dtype}) in {time.perf_counter() - t0:.1f} s")

  for mode in settings.modes:
    flops = model_flops(model_cfg, msa_cfg, work, mode)
    progress(f"[{mode}] compiling ({flops['total'] / 1e12:.3f} model TFLOP per step)")
    info: dict[str, Any] = {}
    try:
      timing = time_mode(step_function(model, mode, settings.ce_chunk_size),
                         (params, memory, prompt), steps=settings.steps, warmup=settings.warmup,
                         progress=progress, label=mode, info=info)
    except Exception as e:  # noqa: BLE001 - record and go on to the next mode
      status = "OOM" if is_oom(e) else "error"
      progress(f"[{mode}] {status}: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}")
      report["results"][mode] = {"status": status, "error": f"{type(e).__name__}: {str(e)[:2000]}",
                                 "model_flops_per_step": flops["total"], **info}
      gc.collect()
      jax.clear_caches()
      continue
    step = statistics.median(timing["step_times_s"])
    stats = memory_stats(device)
    result = {
        "status": "ok",
        "compile_s": timing["compile_s"],
        "step_time_s": step,
        "step_time_min_s": min(timing["step_times_s"]),
        "step_times_s": timing["step_times_s"],
        "tokens_per_s": work.tokens_per_step / step,
        "model_flops_per_step": flops["total"],
        "model_flops_breakdown": flops,
        "model_flops_per_s": flops["total"] / step,
        "mfu": flops["total"] / step / peak if peak else None,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use") if stats else None,
        "bytes_limit": stats.get("bytes_limit") if stats else None,
        "compiled_memory": timing["compiled_memory"],
        "loss": timing["loss"],
    }
    report["results"][mode] = result
    progress(f"[{mode}] done: median {step * 1e3:.2f} ms/step, "
             f"{result['tokens_per_s']:.4g} tokens/s" +
             (f", MFU {result['mfu']:.1%}" if result["mfu"] is not None else ""))
  return report


# --------------------------------------------------------------------------- output


def _fmt(value, spec: str, missing: str = "n/a") -> str:
  return missing if value is None else format(value, spec)


def _gib(value) -> str:
  return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def program_bytes(compiled_memory: dict[str, int] | None) -> int | None:
  """XLA's estimate of a program's footprint: arguments + outputs + temporaries - aliased."""
  if not compiled_memory:
    return None
  return (compiled_memory.get("argument_size_in_bytes", 0) +
          compiled_memory.get("output_size_in_bytes", 0) +
          compiled_memory.get("temp_size_in_bytes", 0) - compiled_memory.get("alias_size_in_bytes", 0))


def format_table(report: dict[str, Any]) -> str:
  """A human-readable table of the report's results. "peak mem" is the device allocator's
  high-water mark so far in the process (n/a on CPU); "XLA mem" is the compiled program's own
  estimate (`program_bytes`), also shown for a mode that ran out of memory after compiling."""
  head = ("mode", "status", "compile s", "step ms", "tokens/s", "TFLOP/step", "TFLOP/s", "MFU",
          "peak mem", "XLA mem")
  rows = [head]
  for mode, r in report["results"].items():
    xla = _gib(program_bytes(r.get("compiled_memory")))
    if r.get("status") != "ok":
      compile_s = _fmt(r.get("compile_s"), ".2f", "-")
      rows.append((mode, r.get("status", "?"), compile_s) + ("-",) * (len(head) - 4) + (xla,))
      continue
    rows.append((mode, "ok", f"{r['compile_s']:.2f}", f"{r['step_time_s'] * 1e3:.2f}",
                 f"{r['tokens_per_s']:.4g}", f"{r['model_flops_per_step'] / 1e12:.4g}",
                 f"{r['model_flops_per_s'] / 1e12:.4g}", _fmt(r["mfu"], ".1%"),
                 _gib(r["peak_bytes_in_use"]), xla))
  widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
  lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  w = report["workload"]
  title = (f"MSA {report['flags']['preset']} on {report['device_kind']} (jax {report['jax_version']}"
           f"): batch {w['batch']}, memory {w['seq_len_mem']} ({w['num_docs']} docs), prompt "
           f"{w['seq_len_prompt']}, remat {report['flags']['remat']}, scan "
           f"{report['flags']['scan_layers']}, params {report['flags']['param_dtype']}")
  return "\n".join([title] + lines)


def chart_path(json_path: str) -> str:
  root, ext = os.path.splitext(json_path)
  return (root if ext.lower() == ".json" else json_path) + ".png"


def write_chart(report: dict[str, Any], path: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  modes = list(report["results"])
  values = [r.get("tokens_per_s") or 0.0 for r in report["results"].values()]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(modes) + 2), 4.0))
  bars = ax.bar(modes, values, color=["tab:blue", "tab:orange", "tab:green"][:len(modes)] or None)
  for bar, r in zip(bars, report["results"].values()):
    if r.get("status") == "ok":
      label = f"{r['tokens_per_s']:.3g}"
      if r.get("mfu") is not None:
        label += f"\nMFU {r['mfu']:.1%}"
    else:
      label = r.get("status", "?")
    ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                va="bottom", fontsize=9)
  w = report["workload"]
  ax.set_ylabel("tokens/s (memory + prompt)")
  ax.set_title(f"MSA {report['flags']['preset']} on {report['device_kind']}\nbatch {w['batch']}, "
               f"mem {w['seq_len_mem']}, doc {report['flags']['doc_len']}, prompt "
               f"{w['seq_len_prompt']}, remat {report['flags']['remat']}, scan "
               f"{report['flags']['scan_layers']}", fontsize=9)
  ax.margins(y=0.2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_report(report: dict[str, Any], json_path: str) -> tuple[str, str]:
  """Writes the JSON report and, next to it, the tokens/s bar chart; returns both paths."""
  return write_json_and_chart(report, json_path, chart_path(json_path), write_chart)


def run_and_report(settings: BenchSettings, output: str | None,
                   progress: Callable[[str], None] = _progress_print) -> dict[str, Any]:
  """The binary's main logic: run, print the table, write JSON + PNG when `output` is given."""
  report = run_benchmark(settings, progress)
  print(format_table(report), flush=True)
  if output:
    json_path, png_path = write_report(report, output)
    progress(f"wrote {json_path} and {png_path}")
  return report

"""The training loop: phases, sharded steps, checkpoints with the data position, metrics, export.

`train(cfg, workdir, data_for_phase, tokenizer_file)` runs every phase of `cfg` in order. Each phase
has its own optimiser (fresh moments, its own schedule, maybe router-only) and its own input
iterator. A run restarted on the same workdir resumes from the newest checkpoint: state, phase and
iterator position, so it continues exactly where the killed run stopped; a config that would change
what trained those steps is refused (`run_record`). At the end the final
parameters are exported as an msa_jax checkpoint directory (`workdir/final`) that `msa_jax.load`
reads, and the curves are plotted.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils

from msa_jax.checkpoint.convert import write_checkpoint_dir
from msa_jax.data.batch import MemoryBatch, PromptBatch
from msa_jax.model.param_layout import unstack_layers
from msa_jax.sharding import make_mesh
from msa_jax.training import optimizer as optlib
from msa_jax.training.checkpointing import TrainCheckpoints
from msa_jax.training.losses import LossWeights
from msa_jax.training.metrics_log import MetricsLog, plot_curves
from msa_jax.training.model_setup import build_model
from msa_jax.training.run_record import check_and_record
from msa_jax.training.train_config import PhaseConfig, TrainConfig
from msa_jax.training.train_step import (TrainState, abstract_state, batch_sharding, init_state,
                                         make_train_step, shardings_of)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
FINAL_DIR = "final"
SNAPSHOT_DIR = "snapshot"


class BatchIterator(Protocol):
  """What a phase's input pipeline provides (a grain iterator does)."""

  def __next__(self) -> tuple[MemoryBatch, PromptBatch]: ...

  def get_state(self) -> Any: ...

  def set_state(self, state: Any) -> None: ...


class SimulatedKill(RuntimeError):
  """Raised by `train(..., stop_after=n)` after step n, as if the process had been killed."""


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  final_dir: str | None
  metrics_file: str


def resolve_mesh_shape(shape, device_count: int) -> tuple[int, ...]:
  """One -1 entry takes the devices the others leave."""
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh {shape}: at most one axis may be -1")
  if any(s <= 0 and s != -1 for s in shape):
    raise ValueError(f"mesh {shape}: axis sizes must be positive (or one -1)")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if device_count % known:
      raise ValueError(f"mesh {shape} does not divide {device_count} devices")
    shape[shape.index(-1)] = device_count // known
  if int(np.prod(shape)) != device_count:
    raise ValueError(f"mesh {shape} needs {int(np.prod(shape))} devices, have {device_count}")
  return tuple(shape)


def to_global_batch(batch, mesh):
  """Host batch (this process's rows) -> global arrays split over (data, fsdp)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def phase_loss_weights(phase: PhaseConfig, msa) -> LossWeights:
  """The phase's loss weights over the model's MSAConfig ones (an unset answer_weight keeps the
  config's)."""
  return LossWeights.of(msa, lm=phase.lm_weight, aux=phase.aux_weight, answer=phase.answer_weight,
                        memory_lm=phase.memory_lm_weight, context_lm=phase.context_lm_weight,
                        prompt_dense=phase.prompt_dense_weight)


def _tokens(memory: MemoryBatch, prompt: PromptBatch) -> int:
  """Real (non-padding) tokens in this process's batch."""
  return int(np.count_nonzero(memory.segment_ids) + np.count_nonzero(prompt.segment_ids))


def _log(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)


def _past_deadline(started: float, seconds: float) -> bool:
  """Whether `seconds` have passed since `started`, by process 0's clock on every host."""
  past = time.monotonic() - started >= seconds
  if jax.process_count() > 1:
    past = bool(multihost_utils.broadcast_one_to_all(np.asarray(past)))
  return past


def train(cfg: TrainConfig, workdir: str,
          data_for_phase: Callable[[int], BatchIterator], *, vocab_size: int | None = None,
          tokenizer_file: str | None = None, stop_after: int | None = None,
          pause_after: int | None = None, pause_after_seconds: float | None = None,
          allow_config_change: bool = False,
          printer: Callable[[str], None] = _log) -> TrainResult:
  """Runs (or resumes) `cfg` in `workdir`. `data_for_phase(i)` gives phase i's batch iterator.

  `pause_after=n` ends the run cleanly after step n (a checkpoint, and the current model exported to
  `<workdir>/snapshot`), so a long run can be split over time-limited jobs; rerunning on the same
  workdir continues it exactly. `pause_after_seconds=t` pauses the same way after the first step
  that ends t seconds or more after the call began (for jobs with a wall-clock limit; on several
  hosts process 0's clock decides, so every host pauses after the same step). A resume under a changed config is refused (`TrainConfigError`
  listing the fields) unless the changes are declared safe or `allow_config_change`.
  `stop_after=n` (tests) raises `SimulatedKill` as a kill would."""
  started = time.monotonic()
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(resolve_mesh_shape(cfg.mesh, jax.device_count()))
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.data.batch_size % rows:
    raise ValueError(f"data.batch_size {cfg.data.batch_size} must divide evenly over the mesh's "
                     f"data x fsdp = {rows} batch shards")
  ckpts = TrainCheckpoints(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  latest = ckpts.latest_step()
  check_and_record(workdir, cfg, latest, allow_change=allow_config_change,
                   write=jax.process_index() == 0, printer=printer)
  built = build_model(cfg.model, mesh, seed=cfg.seed, vocab_size=vocab_size, init=latest is None)
  model = built.model

  data_state = None
  if latest is None:
    step, phase_index = 0, 0
    tx = optlib.make_optimizer(cfg.phases[0], cfg.optimizer, built.params)
    state = init_state(built.params, tx, mesh)
  else:
    data_state = ckpts.read_data_state(latest)
    saved_phase = int(data_state["phase"])
    tx = optlib.make_optimizer(cfg.phases[saved_phase], cfg.optimizer, built.abstract_params)
    target = abstract_state(built.abstract_params, tx, built.shardings, mesh)
    state = ckpts.restore_state(latest, target)
    step = latest
    phase_index = saved_phase
    printer(f"resumed from step {latest} ({cfg.phases[saved_phase].name})")

  log = MetricsLog(os.path.join(workdir, METRICS_FILE), total_steps=cfg.total_steps,
                   start_step=step, every=cfg.log_every, printer=printer)
  printer(f"model: {model.config.num_layers} layers, hidden {model.config.hidden_size}, "
          f"{sum(x.size for x in jax.tree.leaves(built.abstract_params)) / 1e6:.2f}M params; "
          f"mesh {dict(mesh.shape)}; {cfg.total_steps} steps in {len(cfg.phases)} phase(s)")

  current: int | None = None
  batches: BatchIterator | None = None
  step_fn = None
  while step < cfg.total_steps:
    index, phase_step = cfg.phase_at(step)
    phase = cfg.phases[index]
    if index != current:
      if index != phase_index:  # a new phase: fresh optimiser over the trained params
        tx = optlib.make_optimizer(phase, cfg.optimizer, state.params)
        state = init_state(state.params, tx, mesh, step)
        phase_index, data_state = index, None
      batches = data_for_phase(index)
      if data_state is not None:
        batches.set_state(data_state["iterator"])
        data_state = None
      weights = phase_loss_weights(phase, model.msa)
      step_fn = make_train_step(model, tx, mesh, weights=weights, ce_chunk_size=cfg.ce_chunk_size,
                                state_shardings=shardings_of(state))
      schedule = optlib.learning_rate(phase)
      current = index
      printer(f"phase {phase.name}: steps {cfg.phase_start(index)}..{cfg.phase_start(index + 1)}, "
              f"lr {phase.peak_lr:g}->{phase.end_lr:g}, loss {weights}, trains {phase.trainable}, "
              f"memory {phase.memory_tokens}")
    memory, prompt = next(batches)
    tokens = _tokens(memory, prompt)
    state, metrics = step_fn(state, *to_global_batch((memory, prompt), mesh))
    step += 1
    metrics["lr"] = schedule(phase_step)
    phase_end = step == cfg.phase_start(index + 1)
    pause = step < cfg.total_steps and (
        (pause_after is not None and step >= pause_after) or
        (pause_after_seconds is not None and _past_deadline(started, pause_after_seconds)))
    save = step % cfg.checkpoint_every == 0 or phase_end or pause
    log.record(step, phase.name, metrics, tokens, flush=save)
    if save:
      ckpts.save(step, state, {"phase": index, "iterator": batches.get_state()})
    if stop_after is not None and step >= stop_after:
      ckpts.close()
      raise SimulatedKill(f"stopped after step {step}")
    if pause:
      ckpts.close()
      export_final(state, model, os.path.join(workdir, SNAPSHOT_DIR), tokenizer_file)
      printer(f"paused after step {step}; rerun on the same workdir to continue")
      return TrainResult(state, None, os.path.join(workdir, METRICS_FILE))

  ckpts.close()
  final_dir = export_final(state, model, os.path.join(workdir, FINAL_DIR), tokenizer_file)
  if jax.process_index() == 0:
    plot_curves(os.path.join(workdir, METRICS_FILE), os.path.join(workdir, CURVES_FILE))
  return TrainResult(state, final_dir, os.path.join(workdir, METRICS_FILE))


def export_final(state: TrainState, model, out_dir: str, tokenizer_file: str | None) -> str | None:
  """The trained parameters as an msa_jax checkpoint directory (per-layer layout, with tokenizer),
  written by process 0 after every process contributed its shards."""
  params = unstack_layers(multihost_utils.process_allgather(state.params, tiled=True))
  if jax.process_index() != 0:
    return None
  side = [tokenizer_file] if tokenizer_file else []
  return write_checkpoint_dir(out_dir, model.config, model.msa, params, side_files=side,
                              overwrite=True, extra_meta={"trained_steps": int(state.step)})

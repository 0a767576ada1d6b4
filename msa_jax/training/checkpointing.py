"""Training checkpoints: orbax CheckpointManager over (train state, data state), keeping the newest N.

The data state (the input iterator's position and the phase it belongs to) is saved as JSON next to
the train state in the same step directory, so a restore resumes the exact batch sequence: a killed
run restarted from its last checkpoint reproduces the uninterrupted run bit for bit. orbax writes
each step to a temporary directory and renames it when complete, so a kill mid-save leaves the
previous checkpoint as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from msa_jax.checkpoint.errors import restore_error
from msa_jax.training.train_step import TrainState


class TrainCheckpoints:
  """save(step, state, data_state) / restore_latest(abstract_state_fn) over one directory."""

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict[str, Any]) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state)))
    self._manager.wait_until_finished()

  def read_data_state(self, step: int) -> dict[str, Any]:
    """The JSON data state of `step` (read first: it says which phase, hence which optimiser)."""
    return self._restore(step, data=ocp.args.JsonRestore())["data"]

  def restore_state(self, step: int, target: TrainState) -> TrainState:
    """The train state of `step`, placed as `target` (a tree of sharded ShapeDtypeStructs)."""
    return self._restore(step, state=ocp.args.StandardRestore(target))["state"]

  def _restore(self, step: int, **items):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for damaged checkpoints
      raise restore_error(f"the checkpoint of step {step} in {self.directory}", e,
                          f"; remove {self.directory}/{step} to resume from the one before") from e

  def close(self) -> None:
    self._manager.close()

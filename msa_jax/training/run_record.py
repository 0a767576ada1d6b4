"""What a workdir records about its run, and the check that a rerun continues that same run.

A workdir holds `train_config.json` (the config its checkpoints were trained under) and
`history.jsonl` (one line per start, resume or override: time, host, step, and every field that
changed with its old and new value), so the workdir always says what trained its steps.

A rerun on a workdir with checkpoints must use the recorded config, except for changes declared
safe because nothing already trained depends on them:
- bookkeeping: `SAFE_FIELDS` (logging, checkpointing, the mesh, data loader workers);
- more steps for the phase the newest checkpoint is in (the run goes on with it);
- anything about a phase that has not started (later phases added, removed or edited).
Any other change (seed, learning rate, model, data, fewer steps, an earlier phase) is refused with
the list of differing fields, unless the caller overrides explicitly; the history records that.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
from typing import Any, Callable

from msa_jax.training.train_config import (TrainConfig, TrainConfigError, config_from_dict,
                                           config_to_dict)

CONFIG_FILE = "train_config.json"
HISTORY_FILE = "history.jsonl"
SAFE_FIELDS = ("log_every", "checkpoint_every", "keep_checkpoints", "mesh", "data.worker_count")
_ABSENT = "(absent)"
_PHASE_FIELD = re.compile(r"phases\.(\d+)\.(.+)")


def _flatten(obj, prefix: str = "") -> dict[str, Any]:
  """Dotted paths of every leaf; lists of objects (the phases) by index, other lists as values."""
  if isinstance(obj, dict):
    items = obj.items()
  elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
    items = enumerate(obj)
  else:
    return {prefix[:-1]: obj}
  out = {}
  for k, v in items:
    out.update(_flatten(v, f"{prefix}{k}."))
  return out


def config_changes(old: TrainConfig, new: TrainConfig) -> list[tuple[str, Any, Any]]:
  """(field, old value, new value) for every field on which the two configs differ."""
  a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
  return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b), key=_order)
          if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _order(field: str):
  m = _PHASE_FIELD.match(field)
  return ("phases", int(m.group(1)), m.group(2)) if m else (field, 0, "")


def unsafe_changes(old: TrainConfig, changes, step: int) -> list[tuple[str, Any, Any]]:
  """The changes that alter what steps [0, step) were trained under (see the module doc)."""
  current = old.phase_at(step - 1)[0]
  out = []
  for field, was, now in changes:
    m = _PHASE_FIELD.match(field)
    if field in SAFE_FIELDS or (m and old.phase_start(int(m.group(1))) >= step):
      continue
    if (m and int(m.group(1)) == current and m.group(2) == "steps" and isinstance(was, int)
        and isinstance(now, int) and now > was):
      continue
    out.append((field, was, now))
  return out


def _format(changes) -> str:
  return "; ".join(f"{field}: {was!r} -> {now!r}" for field, was, now in changes)


def _recorded(workdir: str) -> TrainConfig:
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      return config_from_dict(json.load(f))
  except (ValueError, OSError) as e:
    raise TrainConfigError(f"{path}: cannot read the config this workdir was trained under "
                           f"({e})") from None


def _append_history(workdir: str, entry: dict) -> None:
  line = json.dumps({"time": datetime.datetime.now().isoformat(timespec="seconds"),
                     "host": socket.gethostname(), **entry}) + "\n"
  with open(os.path.join(workdir, HISTORY_FILE), "a", encoding="utf-8") as f:
    f.write(line)
    f.flush()
    os.fsync(f.fileno())


def check_and_record(workdir: str, cfg: TrainConfig, step: int | None, *, allow_change: bool,
                     write: bool, printer: Callable[[str], None]) -> None:
  """Refuses a rerun whose config changes what the workdir's checkpoints (newest: `step`, None
  when there is none) were trained under, unless `allow_change`; then records `cfg` and the start,
  resume or override in the history (`write`: this process writes the files)."""
  recorded = os.path.join(workdir, CONFIG_FILE)
  event, changes = "start", []
  if step is not None and os.path.exists(recorded):
    old = _recorded(workdir)
    changes = config_changes(old, cfg)
    unsafe = unsafe_changes(old, changes, step)
    if unsafe and not allow_change:
      raise TrainConfigError(
          f"workdir {workdir} was trained to step {step} under another config; resuming with "
          f"this one would change what trained those steps: {_format(unsafe)}. Declared safe: "
          f"more steps for the current phase, edits to phases not yet started, "
          f"{', '.join(SAFE_FIELDS)}. Use a new workdir, or pass --allow_config_change to "
          f"resume anyway (recorded in {HISTORY_FILE})")
    event = "override" if unsafe else "resume"
    if changes:
      printer(f"config changes on resume ({'overridden' if unsafe else 'declared safe'}): "
              f"{_format(changes)}")
  if write:
    _append_history(workdir, {"event": event, "step": step or 0,
                              "changes": [{"field": f, "recorded": was, "now": now}
                                          for f, was, now in changes]})
    with open(recorded, "w", encoding="utf-8") as f:
      json.dump(config_to_dict(cfg), f, indent=2)

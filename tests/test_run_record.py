"""Honest resumes: a rerun on a workdir is compared with the config recorded there; changes to what
trained its steps are refused with the list of fields, declared-safe ones (more steps for the
current phase, later phases, bookkeeping) and explicit overrides go on, and every start, resume
and override lands in the workdir's history."""

import dataclasses
import json
import os

import pytest

from msa_jax.training.metrics_log import read_jsonl
from msa_jax.training.run_record import (CONFIG_FILE, HISTORY_FILE, check_and_record,
                                         config_changes, unsafe_changes)
from msa_jax.training.train_config import PhaseConfig, TrainConfigError, load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_CONFIG = os.path.join(ROOT, "experiments", "configs", "tiny_synthetic_smoke.json")
NEW_PHASE = "add a later phase"


def _cfg(*overrides):
  """The smoke config (phases of 10 and 20 steps) with `--set` overrides, or NEW_PHASE."""
  cfg = load_train_config(SMOKE_CONFIG, [o for o in overrides if o != NEW_PHASE])
  if NEW_PHASE in overrides:
    cfg = dataclasses.replace(cfg, phases=cfg.phases + (PhaseConfig("long", 5, 1e-4, 1e-5),))
  return cfg


@pytest.mark.parametrize("step, overrides, unsafe", [
    (15, ["seed=1"], ["seed"]),
    (15, ["phases.1.peak_lr=0.1", "phases.1.steps=25"], ["phases.1.peak_lr"]),
    (15, ["phases.1.steps=19"], ["phases.1.steps"]),  # fewer steps
    (15, ["phases.0.steps=12"], ["phases.0.steps"]),  # a finished phase
    (15, ["model.overrides.hidden_size=64"], ["model.overrides.hidden_size"]),
    (15, ["data.tasks={\"fact_lookup\": 1.0}"], ["data.tasks.multi_hop", "data.tasks.niah_multi_key",
                                                 "data.tasks.niah_single", "data.tasks.fact_lookup"]),
    (30, ["phases.1.steps=40", NEW_PHASE], []),  # more steps, a later phase
    (5, ["phases.1.peak_lr=0.1", "phases.1.steps=2"], []),  # a phase not yet started
    (10, ["phases.0.steps=12"], []),  # the phase the checkpoint closes goes on
    (15, ["log_every=1", "checkpoint_every=2", "keep_checkpoints=9", "mesh=[2,2,2]",
          "data.worker_count=4"], []),
])
def test_which_changes_are_safe(step, overrides, unsafe):
  old = _cfg()
  changes = config_changes(old, _cfg(*overrides))
  assert changes
  assert sorted(f for f, _, _ in unsafe_changes(old, changes, step)) == sorted(unsafe)


def test_check_and_record_refuses_allows_and_overrides(tmp_path):
  work = str(tmp_path)
  lines = []
  record = lambda cfg, step, allow=False: check_and_record(work, cfg, step, allow_change=allow,
                                                           write=True, printer=lines.append)
  record(_cfg(), None)
  with pytest.raises(TrainConfigError, match=r"trained to step 30 under another config.*"
                                             r"phases.1.end_lr: 0.0003 -> 0.1; seed: 0 -> 7\."):
    record(_cfg("seed=7", "phases.1.end_lr=0.1"), 30)
  with open(os.path.join(work, CONFIG_FILE)) as f:
    assert json.load(f)["seed"] == 0  # refused: nothing rewritten
  record(_cfg("phases.1.steps=40"), 30)
  assert lines[-1] == "config changes on resume (declared safe): phases.1.steps: 20 -> 40"
  record(_cfg("phases.1.steps=40", "seed=7"), 30, allow=True)
  assert lines[-1] == "config changes on resume (overridden): seed: 0 -> 7"
  record(_cfg("phases.1.steps=40", "seed=7"), 35)
  history = read_jsonl(os.path.join(work, HISTORY_FILE))
  assert [(h["event"], h["step"]) for h in history] == [("start", 0), ("resume", 30),
                                                        ("override", 30), ("resume", 35)]
  assert history[1]["changes"] == [{"field": "phases.1.steps", "recorded": 20, "now": 40}]
  assert history[2]["changes"] == [{"field": "seed", "recorded": 0, "now": 7}]
  assert history[3]["changes"] == [] and all(h["host"] and h["time"] for h in history)

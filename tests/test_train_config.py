"""Training configuration: parsing and validation, overrides, phase arithmetic, the learning-rate
schedule and the mesh shape."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from msa_jax.config import MSAConfig
from msa_jax.training.losses import LossWeights
from msa_jax.training.optimizer import learning_rate
from msa_jax.training.train_config import (DataConfig, PhaseConfig, TrainConfig, TrainConfigError,
                                           apply_overrides, config_from_dict, config_to_dict,
                                           load_train_config)
from msa_jax.training.trainer import phase_loss_weights, resolve_mesh_shape

SMOKE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "experiments", "configs", "tiny_synthetic_smoke.json")


def _phase(**kw):
  d = {"name": "p", "steps": 10, "peak_lr": 1e-3, "end_lr": 1e-4}
  d.update(kw)
  return d


def _config(**kw):
  d = {"phases": [_phase(name="warmup", steps=4), _phase(name="main", steps=6)]}
  d.update(kw)
  return d


# --------------------------------------------------------------------------- parsing


def test_smoke_config_parses():
  cfg = load_train_config(SMOKE_CONFIG)
  assert cfg.model.preset == "tiny"
  assert dict(cfg.model.overrides) == {"compute_dtype": "float32"}
  assert cfg.data.source == "synthetic" and cfg.data.batch_size == 8
  assert list(cfg.data.prompt_buckets) == [192, 384]
  assert [p.name for p in cfg.phases] == ["router_warmup", "main"]
  assert cfg.phases[0].lm_weight == 0.1 and cfg.phases[0].aux_weight == 1.0
  assert cfg.phases[1].memory_tokens == 512 and cfg.phases[1].buckets == (512,)
  assert cfg.total_steps == 30
  assert cfg.checkpoint_every == 10 and cfg.log_every == 5
  # unset fields take their defaults
  assert cfg.optimizer.clip_norm == 1.0 and cfg.ce_chunk_size == 1024


CONFIG_DIR = os.path.dirname(SMOKE_CONFIG)


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".json")))
def test_every_shipped_config_parses_and_builds_its_model_config(name):
  """A config a README or script names must load, validate and build its model and MSA configs
  (a stage's init_from is left out: it names a checkpoint that a run makes)."""
  from msa_jax.training.model_setup import model_configs
  cfg = load_train_config(os.path.join(CONFIG_DIR, name), ["model.init_from="])
  model_cfg, msa_cfg = model_configs(cfg.model, 828)
  assert cfg.total_steps > 0 and model_cfg.num_layers > max(msa_cfg.router_layers, default=-1)
  for phase in cfg.phases:
    assert max(phase.buckets) >= phase.memory_tokens


def test_config_round_trips_through_dict():
  cfg = config_from_dict(_config(mesh=[2, -1, 1], data={"batch_size": 4, "tasks": {"niah_single": 1.0}}))
  again = config_from_dict(config_to_dict(cfg))
  assert config_to_dict(again) == config_to_dict(cfg)
  assert again.total_steps == 10 and again.data.batch_size == 4


@pytest.mark.parametrize("where, d, named", [
    ("top level", _config(bogus_field=1), "bogus_field"),
    ("data", _config(data={"batch_sise": 8}), "batch_sise"),
    ("model", _config(model={"prest": "tiny"}), "prest"),
    ("optimizer", _config(optimizer={"beta1": 0.9}), "beta1"),
    ("phase", _config(phases=[_phase(lr=1.0)]), "lr"),
])
def test_unknown_field_is_named(where, d, named):
  with pytest.raises(TrainConfigError, match=named):
    config_from_dict(d)


def test_unknown_phase_field_names_the_phase():
  with pytest.raises(TrainConfigError, match=r"phases\[1\].*warmup"):
    config_from_dict(_config(phases=[_phase(), _phase(warmup=3)]))


def test_missing_required_phase_field():
  with pytest.raises(TrainConfigError, match=r"phases\[0\].*peak_lr"):
    config_from_dict({"phases": [{"name": "p", "steps": 3, "end_lr": 0.0}]})


def test_section_must_be_an_object():
  with pytest.raises(TrainConfigError, match="data must be an object"):
    config_from_dict(_config(data=[1, 2]))
  with pytest.raises(TrainConfigError, match="phases must be a list"):
    config_from_dict({"phases": {"name": "p"}})


def test_no_phases():
  with pytest.raises(TrainConfigError, match="at least one phase"):
    config_from_dict({})
  with pytest.raises(TrainConfigError, match="at least one phase"):
    config_from_dict({"phases": []})


@pytest.mark.parametrize("phase, message", [
    (_phase(steps=0), "steps must be positive, got 0"),
    (_phase(steps=-3), "steps must be positive, got -3"),
    (_phase(trainable="embeddings"), "trainable must be one of.*'embeddings'"),
    (_phase(warmup_steps=11), "warmup_steps 11"),
    (_phase(warmup_steps=-1), "warmup_steps -1"),
    (_phase(peak_lr=0.0), "learning rates must be positive"),
    (_phase(end_lr=-1e-5), "learning rates must be positive"),
    (_phase(memory_tokens=600, mem_buckets=[256, 512]), "memory_tokens 600 exceeds the largest "
     "bucket 512"),
    (_phase(aux_weight=-0.1), r"loss weights must be >= 0, got negative \['aux_weight'\]"),
    (_phase(answer_weight=-1.0, context_lm_weight=-1.0),
     r"negative \['answer_weight', 'context_lm_weight'\]"),
])
def test_phase_validation(phase, message):
  with pytest.raises(TrainConfigError, match=message):
    config_from_dict({"phases": [_phase(name="ok"), dict(phase, name="bad")]})
  # the error names the offending phase
  with pytest.raises(TrainConfigError, match=r"phases\[1\] \(bad\)"):
    config_from_dict({"phases": [_phase(name="ok"), dict(phase, name="bad")]})


def test_phase_validation_accepts_edges():
  cfg = config_from_dict({"phases": [
      _phase(steps=1, warmup_steps=1, end_lr=0.0, trainable="router", memory_tokens=512,
             mem_buckets=[128, 512]),
      _phase(steps=5, warmup_steps=0)]})
  assert cfg.phases[0].buckets == (128, 512)
  assert cfg.phases[1].buckets == (4096,)  # no buckets: the memory size itself
  assert cfg.total_steps == 6


def test_phase_loss_weights_reach_the_objective():
  """A phase's weights, over the model's MSAConfig: options default off, an unset answer_weight
  keeps the config's (a converted checkpoint's ansloss_weight), a set one overrides it."""
  cfg = config_from_dict({"phases": [
      _phase(lm_weight=0.0, aux_weight=0.0, memory_lm_weight=1.0),
      _phase(answer_weight=2.0, context_lm_weight=0.3, prompt_dense_weight=0.1)]})
  msa = MSAConfig(answer_loss_weight=0.5)
  pre, main = (phase_loss_weights(p, msa) for p in cfg.phases)
  assert pre == LossWeights(lm=0.0, aux=0.0, answer=0.5, memory_lm=1.0)
  assert main == LossWeights(lm=1.0, aux=0.1, answer=2.0, context_lm=0.3, prompt_dense=0.1)
  assert str(pre) == "0.5*answer + 1*memory_lm"
  again = config_from_dict(config_to_dict(cfg))
  assert [phase_loss_weights(p, msa) for p in again.phases] == [pre, main]


@pytest.mark.parametrize("d, message", [
    (_config(data={"source": "parquet"}), "data.source.*'parquet'"),
    (_config(data={"batch_size": 0}), "data.batch_size must be positive, got 0"),
    (_config(mesh=[8, 1]), r"mesh must give \(data, fsdp, tensor\)"),
    (_config(data={"tasks": {"fact_lookup": 1.0, "multihop": 1.0}}),
     r"data.tasks: unknown synthetic task\(s\) \['multihop'\]; known: fact_lookup, multi_hop"),
    (_config(data={"long_doc_fraction": 1.5, "long_max_doc_tokens": 2048}),
     r"data.long_doc_fraction must be in \[0, 1\], got 1.5"),
    (_config(data={"long_doc_fraction": 0.2, "max_doc_tokens": 64}),
     r"data.long_max_doc_tokens \(0\) must exceed data.max_doc_tokens \(64\)"),
    (_config(data={"name_negatives": -1}), "data.name_negatives must be >= 0, got -1"),
    (_config(data={"miss_rate": 1.0}), r"data.miss_rate must be in \[0, 1\), got 1.0"),
    (_config(data={"tasks": {"niah_multi_key": 1.0}, "niah_keys": -2}),
     "data.niah_keys must be >= 0, got -2"),
    (_config(data={"tasks": {"niah_single": 1.0}, "niah_keys": 16}),
     r"data.niah_keys needs the niah_multi_key task in data.tasks, got \['niah_single'\]"),
    (_config(data={"tasks": {"niah_single": 1.0}, "card_distractors": 1.0}),
     r"data.card_distractors must be in \[0, 1\), got 1.0"),
    (_config(data={"tasks": {"fact_lookup": 1.0}, "card_distractors": 0.5}),
     r"data.card_distractors needs a needle \(niah_\*\) task in data.tasks, got \['fact_lookup'\]"),
    (_config(data={"tasks": {"niah_single": 1.0}, "miss_rate": 0.3}),
     r"data.miss_rate needs a fact_lookup or multi_hop task in data.tasks"),
    (_config(data={"tasks": {"niah_single": 1.0}, "context_distractors": 2}),
     r"data.context_distractors needs a fact_lookup or multi_hop task in data.tasks, got "
     r"\['niah_single'\]"),
])
def test_run_level_validation(d, message):
  with pytest.raises(TrainConfigError, match=message):
    config_from_dict(d)


def test_train_config_error_is_a_value_error():
  assert issubclass(TrainConfigError, ValueError)


# --------------------------------------------------------------------------- overrides


def test_apply_overrides_nested_and_list_index():
  d = _config(data={"batch_size": 8, "tasks": {"fact_lookup": 1.0}})
  out = apply_overrides(d, ["phases.1.steps=5", "data.batch_size=16", "data.tasks.multi_hop=0.5",
                            "optimizer.clip_norm=0.5", "mesh=[1, -1, 1]"])
  assert out["phases"][1]["steps"] == 5 and out["phases"][0]["steps"] == 4
  assert out["data"]["batch_size"] == 16
  assert out["data"]["tasks"] == {"fact_lookup": 1.0, "multi_hop": 0.5}
  assert out["optimizer"] == {"clip_norm": 0.5}  # a missing section is created
  assert out["mesh"] == [1, -1, 1]
  assert d["phases"][1]["steps"] == 6 and "optimizer" not in d  # the input is not modified
  cfg = config_from_dict(out)
  assert cfg.phases[1].steps == 5 and cfg.total_steps == 9 and cfg.optimizer.clip_norm == 0.5


def test_apply_overrides_list_element():
  out = apply_overrides({"mesh": [-1, 1, 1]}, ["mesh.1=2"])
  assert out["mesh"] == [-1, 2, 1]


def test_apply_overrides_json_values_vs_bare_strings():
  out = apply_overrides({}, ["a=5", "b=1e-3", "c=true", "d=null", "e=\"7\"", "f=hello",
                             "g={\"x\": [1, 2]}", "h=/data/train.jsonl", "i=a=b", "j="])
  assert out["a"] == 5 and isinstance(out["a"], int)
  assert out["b"] == 1e-3 and isinstance(out["b"], float)
  assert out["c"] is True
  assert out["d"] is None
  assert out["e"] == "7"  # a quoted JSON string stays a string
  assert out["f"] == "hello"  # not JSON: a bare string
  assert out["g"] == {"x": [1, 2]}
  assert out["h"] == "/data/train.jsonl"
  assert out["i"] == "a=b"  # split at the first '=' only
  assert out["j"] == ""


def test_apply_overrides_unknown_field_caught_by_validation():
  d = apply_overrides(_config(), ["data.batch_sise=4"])
  with pytest.raises(TrainConfigError, match="batch_sise"):
    config_from_dict(d)


def test_apply_overrides_malformed():
  with pytest.raises(TrainConfigError, match="'phases.0.steps'"):
    apply_overrides(_config(), ["phases.0.steps"])


@pytest.mark.parametrize("item", ["phases.5.steps=1", "phases.x.steps=1", "seed.x=1"])
def test_apply_overrides_bad_path_names_the_override(item):
  d = _config(seed=0)
  with pytest.raises(TrainConfigError, match=item.split("=")[0]):
    apply_overrides(d, [item])


# --------------------------------------------------------------------------- loading


def test_load_train_config_with_overrides(tmp_path):
  path = tmp_path / "run.json"
  path.write_text(json.dumps(_config()))
  cfg = load_train_config(str(path), ["phases.0.trainable=router", "phases.1.name=sft",
                                      "log_every=2"])
  assert cfg.phases[0].trainable == "router" and cfg.phases[1].name == "sft"
  assert cfg.log_every == 2
  # an override that makes the config invalid is caught
  with pytest.raises(TrainConfigError, match="steps must be positive"):
    load_train_config(str(path), ["phases.1.steps=0"])


def test_load_train_config_missing_file(tmp_path):
  missing = str(tmp_path / "nope.json")
  with pytest.raises(TrainConfigError, match="config file not found: .*nope.json"):
    load_train_config(missing)


def test_load_train_config_invalid_json(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('{"phases": [ {"name": "p", }')
  with pytest.raises(TrainConfigError, match="broken.json is not valid JSON"):
    load_train_config(str(path))
  path.write_bytes(b'{\n  "seed": "caf\xe9"}')  # Latin-1, not UTF-8
  with pytest.raises(TrainConfigError, match=r"broken.json:2: not UTF-8 text"):
    load_train_config(str(path))


# --------------------------------------------------------------------------- phase arithmetic


def test_phase_arithmetic():
  cfg = config_from_dict({"phases": [_phase(name="a", steps=3), _phase(name="b", steps=1),
                                     _phase(name="c", steps=4)]})
  assert cfg.total_steps == 8
  assert [cfg.phase_start(i) for i in range(4)] == [0, 3, 4, 8]
  expected = [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1), (2, 2), (2, 3)]
  assert [cfg.phase_at(s) for s in range(8)] == expected
  # past the end: the last phase, finished
  assert cfg.phase_at(8) == (2, 4)
  assert cfg.phase_at(100) == (2, 4)
  # every step maps back to itself
  for s in range(8):
    i, k = cfg.phase_at(s)
    assert cfg.phase_start(i) + k == s and 0 <= k < cfg.phases[i].steps


def test_total_steps_default_config():
  assert TrainConfig().total_steps == 0
  assert DataConfig().batch_size == 8


# --------------------------------------------------------------------------- learning rate


def test_learning_rate_warmup_then_cosine():
  phase = PhaseConfig("p", steps=10, peak_lr=1e-3, end_lr=1e-4, warmup_steps=4)
  lr = learning_rate(phase)
  values = np.array([float(lr(i)) for i in range(11)])
  assert values[0] == 0.0
  np.testing.assert_allclose(values[2], 0.5e-3, rtol=1e-6)  # linear warm-up
  np.testing.assert_allclose(values[4], 1e-3, rtol=1e-6)  # peak at the end of the warm-up
  np.testing.assert_allclose(values[10], 1e-4, rtol=1e-6)  # end_lr at the end of the phase
  assert np.all(np.diff(values[:5]) > 0)
  assert np.all(np.diff(values[4:]) < 0)
  assert np.all(values[4:] >= 1e-4 - 1e-12)
  # cosine: halfway through the decay, halfway between peak and end
  np.testing.assert_allclose(values[7], (1e-3 + 1e-4) / 2, rtol=1e-6)


def test_learning_rate_without_warmup_starts_at_peak():
  lr = learning_rate(PhaseConfig("p", steps=8, peak_lr=2e-3, end_lr=0.0, warmup_steps=0))
  np.testing.assert_allclose(float(lr(0)), 2e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(8)), 0.0, atol=1e-12)
  assert float(lr(4)) < 2e-3


def test_learning_rate_all_warmup():
  lr = learning_rate(PhaseConfig("p", steps=5, peak_lr=1e-3, end_lr=1e-4, warmup_steps=5))
  values = [float(lr(i)) for i in range(6)]
  np.testing.assert_allclose(values, [0.0, 2e-4, 4e-4, 6e-4, 8e-4, 1e-3], rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------- mesh


@pytest.mark.parametrize("shape, devices, expected", [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((1, -1, 1), 8, (1, 8, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((2, 2, -1), 8, (2, 2, 2)),
    ((2, 4, 1), 8, (2, 4, 1)),
    ([-1, 1, 1], 1, (1, 1, 1)),
])
def test_resolve_mesh_shape(shape, devices, expected):
  assert resolve_mesh_shape(shape, devices) == expected


@pytest.mark.parametrize("shape, devices, message", [
    ((2, 2, 1), 8, "needs 4 devices, have 8"),
    ((4, 4, 1), 8, "needs 16 devices, have 8"),
    ((3, -1, 1), 8, "does not divide 8 devices"),
    ((-1, -1, 1), 8, "at most one axis may be -1"),
    ((0, -1, 1), 8, "mesh"),
    ((-2, -4, 1), 8, "mesh"),
])
def test_resolve_mesh_shape_errors(shape, devices, message):
  with pytest.raises(ValueError, match=message):
    resolve_mesh_shape(shape, devices)

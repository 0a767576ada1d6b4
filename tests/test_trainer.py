"""The training loop on 8 simulated CPU devices: the loss falls, a killed run resumes bit for bit, the
sharded step equals the single-device step, router-only phases train only the router, and bad
batch / mesh combinations are refused."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import msa_jax
from msa_jax.model.param_layout import unstack_layers
from msa_jax.sharding import make_mesh
from msa_jax.training import data_setup
from msa_jax.training import optimizer as optlib
from msa_jax.training import run_record
from msa_jax.training.metrics_log import read_jsonl
from msa_jax.training.model_setup import build_model, model_configs
from msa_jax.training.train_config import TrainConfigError, load_train_config
from msa_jax.training.train_step import batch_sharding, init_state, make_train_step, shardings_of
from msa_jax.training.trainer import (CURVES_FILE, FINAL_DIR, METRICS_FILE, SNAPSHOT_DIR,
                                      SimulatedKill, phase_loss_weights, train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_CONFIG = os.path.join(ROOT, "experiments", "configs", "tiny_synthetic_smoke.json")

# Small, fixed shapes: one prompt bucket and one memory size per phase, so every phase compiles
# its step once (the synthetic prompts of these memories fit 256 tokens).
SMALL = ["data.prompt_buckets=[256]", "phases.0.memory_tokens=128", "phases.1.memory_tokens=128"]


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module: a resumed run compiles the very steps the
  uninterrupted run did (same program, same shardings), so it loads them instead (CPU time only;
  the executables are the same). Restored afterwards."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cc.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  cc.reset_cache()


def _setup(overrides):
  cfg = load_train_config(SMOKE_CONFIG, overrides)
  tokenizer = data_setup.load_tokenizer(cfg.data)
  _, msa = model_configs(cfg.model, tokenizer.vocab_size)
  batches = data_setup.data_for_phase(cfg.data, cfg.phases, msa, tokenizer)
  return cfg, tokenizer, batches


def _run(cfg, tokenizer, batches, workdir, lines=None, **kw):
  lines = [] if lines is None else lines
  result = train(cfg, str(workdir), batches, vocab_size=tokenizer.vocab_size,
                 printer=lines.append, **kw)
  return result, lines


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_trees_identical(got, want):
  got, want = _leaves(got), _leaves(want)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    assert np.array_equal(got[k], want[k]), f"{k} differs: max |Δ| " \
        f"{np.max(np.abs(got[k].astype(np.float64) - want[k].astype(np.float64)))}"


# --------------------------------------------------------------------------- end to end


def test_synthetic_run_lowers_the_loss_and_exports(tmp_path):
  assert jax.device_count() == 8
  cfg, tokenizer, batches = _setup(SMALL + ["mesh=[-1,1,1]"])
  assert cfg.total_steps == 30 and cfg.log_every == 5
  tok_file = data_setup.tokenizer_file(cfg.data, str(tmp_path))
  result, lines = _run(cfg, tokenizer, batches, tmp_path / "run", tokenizer_file=tok_file)

  rows = read_jsonl(result.metrics_file)
  assert result.metrics_file == str(tmp_path / "run" / METRICS_FILE)
  # one line per window of log_every steps, labelled with its phase
  assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
  assert [r["phase"] for r in rows] == ["router_warmup"] * 2 + ["main"] * 4
  for r in rows:
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens_per_s", "step_time_s",
                "recall@1/layer2", "recall@5/layer3"):
      assert key in r and np.isfinite(r[key]), (key, r)
    assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["lr"] > 0
    assert all(0.0 <= r[k] <= 1.0 for k in r if k.startswith("recall@"))
  # the total is the phase's weighted sum of the two losses
  for r, (lm_w, aux_w) in zip(rows, [(0.1, 1.0)] * 2 + [(1.0, 0.1)] * 4):
    np.testing.assert_allclose(r["loss"], lm_w * r["lm_loss"] + aux_w * r["aux_loss"], rtol=1e-5)
  first, last = rows[0]["lm_loss"], rows[-1]["lm_loss"]
  print(f"lm_loss {first:.3f} -> {last:.3f}")
  assert last < 0.8 * first

  # progress lines: phases announced, every window reported
  assert any(l.startswith("phase router_warmup: steps 0..10") for l in lines)
  assert any(l.startswith("phase main: steps 10..30") for l in lines)
  assert sum(l.startswith("step ") for l in lines) == 6
  assert int(result.state.step) == 30

  # the exported model loads and holds the trained parameters
  assert os.path.isdir(result.final_dir)
  assert result.final_dir == os.path.abspath(tmp_path / "run" / FINAL_DIR)
  loaded = msa_jax.load(result.final_dir)
  assert loaded.tokenizer is not None
  assert loaded.tokenizer.vocab_size == tokenizer.vocab_size
  assert loaded.model_config.compute_dtype == "float32" and loaded.model_config.num_layers == 4
  assert loaded.msa_config.router_layers == (2, 3)
  _assert_trees_identical(unstack_layers(loaded.params), unstack_layers(_host(result.state.params)))
  with open(os.path.join(result.final_dir, "msa_jax_config.json")) as f:
    assert json.load(f)["trained_steps"] == 30
  assert os.path.getsize(tmp_path / "run" / CURVES_FILE) > 0
  with open(tmp_path / "run" / "train_config.json") as f:
    assert json.load(f)["phases"][1]["steps"] == 20


# --------------------------------------------------------------------------- kill and resume

# A router-only warm-up of 4 steps on 128-token memories, then 6 steps training everything on
# 256-token memories; checkpoints at 3, 4 (phase end), 6 and 9; log windows of 5 steps, which a
# checkpoint or a phase end closes early. No warm-up: every step moves the parameters. The step
# tests below reuse these phases on the same mesh (the compilation cache then serves their steps).
RESUME = ["data.prompt_buckets=[256]", "mesh=[2,2,2]", "phases.0.steps=4", "phases.1.steps=6",
          "phases.0.memory_tokens=128", "phases.1.memory_tokens=256", "phases.0.warmup_steps=0",
          "phases.1.warmup_steps=0", "phases.0.trainable=router", "checkpoint_every=3",
          "keep_checkpoints=2", "log_every=5"]


def _checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def _comparable(rows):
  """The metrics lines without their timing columns."""
  return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")} for r in rows]


def test_kill_and_resume_is_bit_identical(tmp_path):
  cfg, tokenizer, batches = _setup(RESUME)
  assert cfg.total_steps == 10
  want, _ = _run(cfg, tokenizer, batches, tmp_path / "straight")
  want_params = _host(want.state.params)
  want_rows = read_jsonl(want.metrics_file)

  work = tmp_path / "killed"
  # killed one step after the phase-end checkpoint (step 4): step 5 was logged but is lost, and
  # the restarted run resumes into the second phase
  with pytest.raises(SimulatedKill, match="after step 5"):
    _run(cfg, tokenizer, batches, work, stop_after=5)
  assert _checkpoint_steps(work) == [3, 4]
  assert read_jsonl(work / METRICS_FILE)[-1]["step"] == 5
  # killed mid-phase: the checkpoint of step 6 is the latest, step 7's work is lost
  lines = []
  with pytest.raises(SimulatedKill, match="after step 7"):
    _run(cfg, tokenizer, batches, work, lines, stop_after=7)
  assert "resumed from step 4 (router_warmup)" in lines
  assert _checkpoint_steps(work) == [4, 6]  # keep_checkpoints=2
  # paused cleanly (a time-limited job): checkpoint and snapshot of step 9, no final model yet
  paused, lines = _run(cfg, tokenizer, batches, work, pause_after=9)
  assert "resumed from step 6 (main)" in lines and paused.final_dir is None
  assert _checkpoint_steps(work) == [6, 9] and not (work / FINAL_DIR).exists()
  _assert_trees_identical(msa_jax.load(str(work / SNAPSHOT_DIR)).params,
                          unstack_layers(_host(paused.state.params)))
  got, lines = _run(cfg, tokenizer, batches, work)
  assert "resumed from step 9 (main)" in lines
  assert int(got.state.step) == 10
  _assert_trees_identical(_host(got.state.params), want_params)
  _assert_trees_identical(_host(got.state.opt_state), _host(want.state.opt_state))
  # the exported models agree too
  _assert_trees_identical(msa_jax.load(got.final_dir).params, msa_jax.load(want.final_dir).params)

  got_rows = read_jsonl(got.metrics_file)
  got_steps = [r["step"] for r in got_rows]
  assert len(got_steps) == len(set(got_steps)), f"duplicate steps {got_steps}"
  assert got_steps == sorted(got_steps)
  assert got_steps == [r["step"] for r in want_rows] == [3, 4, 5, 6, 9, 10]
  assert _comparable(got_rows) == _comparable(want_rows)
  # a window never mixes phases: every phase ends a window
  phase_end = cfg.phase_start(1)
  assert phase_end in got_steps
  assert all(r["phase"] == ("router_warmup" if r["step"] <= phase_end else "main")
             for r in got_rows)

  # restarting a finished run reads no data, trains nothing and exports the same model
  def no_data(index):
    raise AssertionError(f"a finished run read phase {index}'s data")

  again, lines = _run(cfg, tokenizer, no_data, work)
  assert "resumed from step 10 (main)" in lines
  _assert_trees_identical(_host(again.state.params), want_params)
  assert read_jsonl(again.metrics_file) == got_rows
  _assert_trees_identical(msa_jax.load(again.final_dir).params,
                          msa_jax.load(want.final_dir).params)


def test_a_rerun_under_another_config_is_refused_unless_declared_safe(tmp_path):
  cfg, tokenizer, batches = _setup(RESUME)
  work = tmp_path / "run"
  _run(cfg, tokenizer, batches, work, pause_after=1)
  reseeded, _, _ = _setup(RESUME + ["seed=1"])
  with pytest.raises(TrainConfigError, match=r"trained to step 1 under another config.*"
                                             r"seed: 0 -> 1\."):
    _run(reseeded, tokenizer, batches, work)
  assert _checkpoint_steps(work) == [1]
  with open(work / run_record.CONFIG_FILE) as f:
    assert json.load(f)["seed"] == 0
  longer, _, _ = _setup(RESUME + ["phases.0.steps=5"])
  _, lines = _run(longer, tokenizer, batches, work, pause_after=2)
  assert "config changes on resume (declared safe): phases.0.steps: 4 -> 5" in lines
  _, lines = _run(reseeded, tokenizer, batches, work, pause_after=3, allow_config_change=True)
  assert "config changes on resume (overridden): phases.0.steps: 5 -> 4; seed: 0 -> 1" in lines
  history = read_jsonl(work / run_record.HISTORY_FILE)
  assert [(h["event"], h["step"]) for h in history] == [("start", 0), ("resume", 1),
                                                        ("override", 2)]
  assert _checkpoint_steps(work) == [2, 3]


# --------------------------------------------------------------------------- the step itself


def _phase_step(cfg, index, model, mesh, params):
  """A fresh TrainState over `params` and phase `index`'s jitted train step."""
  phase = cfg.phases[index]
  tx = optlib.make_optimizer(phase, cfg.optimizer, params)
  state = init_state(params, tx, mesh)
  fn = make_train_step(model, tx, mesh, weights=phase_loss_weights(phase, model.msa),
                       ce_chunk_size=cfg.ce_chunk_size, state_shardings=shardings_of(state))
  return state, fn


def test_sharded_step_equals_single_device_step():
  cfg, tokenizer, batches = _setup(RESUME)
  assert cfg.phases[1].trainable == "all" and cfg.phases[1].warmup_steps == 0
  batch = next(batches(1))
  one = make_mesh((1, 1, 1), devices=jax.devices()[:1])
  built = build_model(cfg.model, one, seed=cfg.seed, vocab_size=tokenizer.vocab_size)
  params = _host(built.params)
  mesh = make_mesh((2, 2, 2))
  sharded = build_model(cfg.model, mesh, seed=cfg.seed, vocab_size=tokenizer.vocab_size,
                        init=False)
  placed = jax.tree.map(jax.device_put, params, sharded.shardings)
  q = placed["layers_2"]["attn"]["q_proj"]["kernel"]
  assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated

  results = {}
  for name, m, p in (("one", one, built.params), ("eight", mesh, placed)):
    state, fn = _phase_step(cfg, 1, built.model, m, p)
    memory, prompt = jax.device_put(batch, batch_sharding(m))
    state, metrics = fn(state, memory, prompt)
    after_one = _host(state)
    _, metrics2 = fn(state, memory, prompt)  # the loss at the updated parameters
    results[name] = after_one, _host(metrics), _host(metrics2)
    assert len(jax.tree.leaves(metrics)[0].sharding.device_set) == len(m.devices.flat)
  (s1, m1, n1), (s8, m8, n8) = results["one"], results["eight"]
  assert int(s1.step) == int(s8.step) == 1
  assert m1.keys() == m8.keys() and {"loss", "lm_loss", "aux_loss", "grad_norm"} <= m1.keys()
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], atol=1e-5, rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(n8[k], n1[k], atol=1e-5, rtol=1e-5, err_msg=k)
  assert n1["loss"] < m1["loss"]  # the step moved the parameters downhill
  # the same (clipped) gradient in the Adam moments (mu = 0.1 g, nu = 0.001 g^2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6, rtol=0),
               s1.opt_state, s8.opt_state)
  # the same new parameters. Adam's first step moves a parameter by about lr * g / (|g| + eps):
  # where |g| is within a few hundred eps of 0 (rare tokens' embedding rows), that ratio turns the
  # float noise of a differently summed g into ~1e-5 differences, so those elements (~0.3%) are
  # covered by the gradient comparison above instead.
  mu1, mu8 = _leaves(s1.opt_state[1][0].mu), _leaves(s8.opt_state[1][0].mu)
  p1, p8, p0 = _leaves(s1.params), _leaves(s8.params), _leaves(params)
  assert mu1.keys() == p1.keys()
  compared = 0
  for k in p1:
    well = (np.abs(mu1[k]) >= 1e-7) | ((mu1[k] == 0) & (mu8[k] == 0))
    np.testing.assert_allclose(p8[k][well], p1[k][well], atol=1e-5, rtol=0, err_msg=k)
    compared += int(well.sum())
  assert compared > 0.99 * sum(x.size for x in p1.values())
  assert max(float(np.max(np.abs(p1[k] - p0[k]))) for k in p1) > 1e-3  # lr 3e-3: they moved


def test_router_only_phase_trains_only_the_router():
  cfg, tokenizer, batches = _setup(RESUME)
  assert cfg.phases[0].trainable == "router" and cfg.phases[0].warmup_steps == 0
  mesh = make_mesh((2, 2, 2))
  built = build_model(cfg.model, mesh, seed=cfg.seed, vocab_size=tokenizer.vocab_size)
  before = _leaves(_host(built.params))
  state, fn = _phase_step(cfg, 0, built.model, mesh, built.params)
  state, metrics = fn(state, *jax.device_put(next(batches(0)), batch_sharding(mesh)))
  assert float(metrics["grad_norm"]) > 0
  assert int(state.step) == 1
  after = _leaves(_host(state.params))
  router = [k for k in before if "router_q" in k or "router_k" in k]
  assert len(router) == 4  # router_q and router_k of layers 2 and 3
  for k in before:
    if k in router:
      assert not np.array_equal(after[k], before[k]), f"router leaf {k} did not change"
    else:
      assert np.array_equal(after[k], before[k]), f"frozen leaf {k} changed"


def test_router_only_phase_needs_router_parameters():
  cfg, _, _ = _setup(SMALL + ["phases.0.trainable=router"])
  params = {"embed": {"embedding": np.zeros((4, 2))}, "layers_0": {"mlp": np.zeros((2, 2))}}
  with pytest.raises(ValueError, match="trains the router only.*no router parameters"):
    optlib.make_optimizer(cfg.phases[0], cfg.optimizer, params)


# --------------------------------------------------------------------------- bad configurations


def test_batch_size_must_divide_over_the_mesh(tmp_path):
  cfg, tokenizer, batches = _setup(SMALL + ["mesh=[-1,1,1]", "data.batch_size=6"])
  with pytest.raises(ValueError, match=r"data.batch_size 6 .*data x fsdp = 8"):
    _run(cfg, tokenizer, batches, tmp_path)
  cfg, tokenizer, batches = _setup(SMALL + ["mesh=[2,1,4]", "data.batch_size=3"])
  with pytest.raises(ValueError, match=r"data.batch_size 3 .*data x fsdp = 2"):
    _run(cfg, tokenizer, batches, tmp_path)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_mesh_must_cover_the_devices(tmp_path):
  cfg, tokenizer, batches = _setup(SMALL + ["mesh=[2,2,1]"])
  with pytest.raises(ValueError, match=r"needs 4 devices, have 8"):
    _run(cfg, tokenizer, batches, tmp_path)

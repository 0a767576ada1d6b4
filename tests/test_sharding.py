"""The forward jitted on 8 simulated CPU devices (data, fsdp, tensor) equals the single-device forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from msa_jax import config as cfglib
from msa_jax.data.batch import plain_prompt
from msa_jax.model.model import MSAForCausalLM
from msa_jax.sharding import LOGICAL_RULES, make_mesh, param_shardings


@pytest.mark.parametrize("scan_layers,tied", [(False, False), (True, True)])
def test_sharded_forward_equals_single_device(scan_layers, tied):
  assert jax.device_count() == 8
  model_cfg, msa_cfg = cfglib.preset("tiny")
  model_cfg = model_cfg.replace(compute_dtype="float32", scan_layers=scan_layers,
                                tie_word_embeddings=tied)
  model = MSAForCausalLM(model_cfg, msa_cfg)
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, model_cfg.vocab_size)
  segment_ids = jnp.ones_like(tokens).at[1, 10:].set(0).at[3, 5:].set(0)
  prompt = plain_prompt(tokens, None, segment_ids)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), prompt)["params"])

  def logits(p, pr):
    return model.apply({"params": p}, pr, method=MSAForCausalLM.prompt_logits)[0]

  expected = jax.jit(logits)(params, prompt)

  mesh = make_mesh((2, 2, 2))
  shardings = param_shardings(model, mesh, prompt)
  sharded_params = jax.device_put(params, shardings)
  q_kernel = (sharded_params["block_2_4"] if scan_layers else sharded_params["layers_2"])
  q_kernel = q_kernel["attn"]["q_proj"]["kernel"]
  # embed over fsdp, heads over tensor: each device holds a quarter of the kernel
  assert q_kernel.addressable_shards[0].data.size * 4 == q_kernel.size
  batch = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
  prompt_s = jax.device_put(prompt, batch)

  @jax.jit
  def forward(p, pr):
    with nn.logical_axis_rules(LOGICAL_RULES):
      return logits(p, pr)

  with jax.set_mesh(mesh):
    got = forward(sharded_params, prompt_s)
  assert len(got.sharding.device_set) == 8
  err = float(jnp.max(jnp.abs(got - expected)))
  print(f"sharded vs single-device max |Δlogits| = {err:.2e}")
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)


def test_msa_forward_and_gradient_sharded_equal_single_device():
  from msa_jax.training.objective import loss_and_metrics
  from tests.msa_fixtures import make_batch, random_samples
  model_cfg, msa_cfg = cfglib.preset("tiny")
  model = MSAForCausalLM(model_cfg.replace(compute_dtype="float32"), msa_cfg)
  samples = random_samples(np.random.default_rng(0), [[5, 9, 3], [12, 4], [7, 7, 7], [2, 30]])
  memory, prompt = make_batch(samples, msa_cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), prompt, memory)["params"])

  def loss(p, m, pr):
    with nn.logical_axis_rules(LOGICAL_RULES):
      return loss_and_metrics(p, model, m, pr)

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (want_loss, want_metrics), want_grad = grad_fn(params, memory, prompt)

  mesh = make_mesh((2, 2, 2))
  batch = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
  sharded = jax.device_put(params, param_shardings(model, mesh, prompt, memory))
  memory_s, prompt_s = jax.device_put(memory, batch), jax.device_put(prompt, batch)
  with jax.set_mesh(mesh):
    (got_loss, got_metrics), got_grad = grad_fn(sharded, memory_s, prompt_s)
  print(f"sharded MSA loss {float(got_loss):.6f} vs {float(want_loss):.6f}")
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(got_metrics["aux_loss"], want_metrics["aux_loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), got_grad, want_grad)
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(got_grad))


def _model_shardings(loaded, mesh):
  from msa_jax.training.model_setup import dummy_batch
  memory, prompt = dummy_batch(loaded.model_config, loaded.msa_config)
  return param_shardings(loaded.model, mesh, prompt, memory)


@pytest.mark.parametrize("source", ["msa_jax", "hf"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_load_places_each_parameter_on_its_sharding(tmp_path, source, scan_layers):
  import os
  import msa_jax
  from msa_jax.checkpoint.random_hf import write_random_hf_checkpoint
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(root, "models", "tiny_msa")
  if source == "hf":
    model_cfg, msa_cfg = cfglib.preset("tiny")
    path = write_random_hf_checkpoint(str(tmp_path / "hf"), model_cfg, msa_cfg)
  plain = msa_jax.load(path, scan_layers=scan_layers)
  mesh = make_mesh((2, 2, 2))
  shardings = _model_shardings(plain, mesh)
  sharded = msa_jax.load(path, scan_layers=scan_layers, shardings=shardings)
  assert jax.tree.structure(sharded.params) == jax.tree.structure(plain.params)
  for got, want, s in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(plain.params),
                          jax.tree.leaves(shardings)):
    assert got.sharding.is_equivalent_to(s, got.ndim), (got.sharding, s)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  leaves = jax.tree.leaves(sharded.params)
  on_first_device = sum(x.addressable_shards[0].data.size for x in leaves)
  assert on_first_device * 2 < sum(x.size for x in leaves)  # no device holds the whole model


def test_training_init_from_loads_onto_the_train_shardings():
  import os
  import msa_jax
  from msa_jax.training.model_setup import build_model
  from msa_jax.training.train_config import ModelSpec
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                      "tiny_msa")
  built = build_model(ModelSpec(init_from=path), make_mesh((2, 2, 2)), seed=0, vocab_size=None)
  plain = msa_jax.load(path)
  for got, want, s in zip(jax.tree.leaves(built.params), jax.tree.leaves(plain.params),
                          jax.tree.leaves(built.shardings)):
    assert got.sharding.is_equivalent_to(s, got.ndim)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

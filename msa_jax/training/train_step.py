"""The train state and the sharded, jitted train step.

Parameters are placed by the model's logical axis names (`sharding.LOGICAL_RULES`); the optimiser
state is initialised by a jitted `init` so its moments inherit the parameters' shardings; the batch
is split over (`data`, `fsdp`). The step's input and output shardings are the state's own, so the
state stays where it is across steps and is donated (updated in place).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msa_jax.model.model import MSAForCausalLM
from msa_jax.sharding import LOGICAL_RULES
from msa_jax.training.losses import LossWeights
from msa_jax.training.objective import loss_and_metrics


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # global step (int32 scalar)
  params: Any
  opt_state: Any


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over data x fsdp; every other dimension whole."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _opt_state_shardings(tx: optax.GradientTransformation, params, mesh: Mesh):
  """Moments inherit the parameters' shardings (jit propagates them); leaves that no parameter
  feeds (step counts) would land on one device, so they are replicated over the mesh instead."""
  compiled = jax.jit(tx.init).lower(params).compile()
  return jax.tree.map(lambda s: s if isinstance(s, NamedSharding) else replicated(mesh),
                      compiled.output_shardings)


def init_state(params, tx: optax.GradientTransformation, mesh: Mesh, step: int = 0) -> TrainState:
  """A TrainState around (already placed) params; optimiser moments follow their shardings."""
  opt_state = jax.jit(tx.init, out_shardings=_opt_state_shardings(tx, params, mesh))(params)
  step = jax.device_put(jnp.asarray(step, jnp.int32), replicated(mesh))
  return TrainState(step=step, params=params, opt_state=opt_state)


def _with_shardings(shapes, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                      shardings)


def abstract_state(params_abstract, tx: optax.GradientTransformation, param_shardings,
                   mesh: Mesh) -> TrainState:
  """The state's shapes, dtypes and shardings without allocating it (the target of a restore):
  the optimiser state's shardings are those `init_state`'s jitted init gives."""
  params = _with_shardings(params_abstract, param_shardings)
  opt_state = _with_shardings(jax.eval_shape(tx.init, params),
                              _opt_state_shardings(tx, params, mesh))
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
  return TrainState(step=step, params=params, opt_state=opt_state)


def make_train_step(model: MSAForCausalLM, tx: optax.GradientTransformation, mesh: Mesh, *,
                    weights: LossWeights, ce_chunk_size: int, state_shardings):
  """A jitted `(state, memory, prompt) -> (state, metrics)`; metrics are replicated scalars."""

  def loss_fn(params, memory, prompt):
    with nn.logical_axis_rules(LOGICAL_RULES):
      return loss_and_metrics(params, model, memory, prompt, ce_chunk_size=ce_chunk_size,
                              weights=weights)

  def step(state: TrainState, memory, prompt):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, memory, prompt)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch = batch_sharding(mesh)
  return jax.jit(step, in_shardings=(state_shardings, batch, batch),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def shardings_of(tree):
  """The shardings of a tree of placed arrays (or sharded ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: x.sharding, tree)

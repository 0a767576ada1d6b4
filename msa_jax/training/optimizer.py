"""AdamW with linear warm-up + cosine decay and global-norm clipping; optionally router-only.

The router warm-up may train only the router (MSA_PAPER.md §2.3 leaves the warm-up's scope open;
its 1e-4 learning rate suggests router-mostly): a masked optimiser then gives every other parameter
a zero update and keeps no Adam moments for it.
"""

from __future__ import annotations

import jax
import optax

from msa_jax.training.train_config import OptimizerConfig, PhaseConfig

ROUTER_PARAM_NAMES = ("router_q", "router_k", "bce_bias")


def learning_rate(phase: PhaseConfig) -> optax.Schedule:
  """0 → peak over warmup_steps, then cosine to end_lr at the end of the phase."""
  if phase.warmup_steps >= phase.steps:
    return optax.linear_schedule(0.0, phase.peak_lr, max(phase.steps, 1))
  return optax.warmup_cosine_decay_schedule(0.0, phase.peak_lr, phase.warmup_steps, phase.steps,
                                            phase.end_lr)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_router_param(path) -> bool:
  return any(name in ROUTER_PARAM_NAMES for name in _path_names(path))


def _decay_mask(params):
  """Weight decay on matrices only (not on norm scales or scalars). A callable, so it also fits
  the sub-tree a masked (router-only) optimiser hands it."""
  return jax.tree.map(lambda leaf: leaf.ndim >= 2, params)


def make_optimizer(phase: PhaseConfig, cfg: OptimizerConfig, params) -> optax.GradientTransformation:
  """The phase's optimiser for a parameter tree shaped like `params` (arrays or ShapeDtypeStructs)."""
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(learning_rate(phase), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=_decay_mask))
  if phase.trainable == "all":
    return tx
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if is_router_param(path) else "freeze", params)
  if "train" not in jax.tree.leaves(labels):
    raise ValueError(f"phase {phase.name!r} trains the router only, but the model has no router "
                     f"parameters ({', '.join(ROUTER_PARAM_NAMES)})")
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)

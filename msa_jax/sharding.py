"""Meshes and logical-axis rules: how named parameter/activation axes map onto mesh axes.

Training meshes have axes (`data`, `fsdp`, `tensor`); serving adds `memory`. Meshes are built
with `AxisType.Auto` because `jax.make_mesh` now defaults to Explicit axes, under which Linen's
sharding constraints act as assertions.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh

TRAIN_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Weights shard their `embed` dim over fsdp and their head / mlp / vocab
# dims over tensor; activations shard batch over data and fsdp.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = TRAIN_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with Auto axis types over `devices` (default: all devices)."""
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {tuple(shape)} and axis names {tuple(axis_names)} differ in length")
  return jax.make_mesh(tuple(shape), tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def logical_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree of `nn.Partitioned` boxes (e.g. `jax.eval_shape(model.init, ...)`)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def param_shardings(module: nn.Module, mesh: Mesh, *init_args, rules=LOGICAL_RULES):
  """NamedShardings of `module`'s parameters (unboxed tree shape), from its logical axis names."""
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *init_args))["params"]
  return logical_shardings(boxed, mesh, rules)

"""What every kernel registry (`kernels/<op>/api.py`) shares: "auto" picks by backend, and a
kernel that cannot take a call says why once per reason, then the op's fallback runs."""

from __future__ import annotations

import warnings

import jax


def resolve(op: str, implementation: str, implementations, by_backend: dict[str, str],
            default: str) -> str:
  """The implementation `implementation` names on this backend ("auto" picks one)."""
  if implementation not in implementations:
    raise ValueError(f"unknown {op} implementation {implementation!r}; choose from "
                     f"{implementations}")
  if implementation == "auto":
    return by_backend.get(jax.default_backend(), default)
  return implementation


def warn_fallback(warned: set, op: str, name: str, why: str, fallback: str) -> None:
  if (name, why) not in warned:
    warned.add((name, why))
    warnings.warn(f"{op}: {name} cannot run this call ({why}); using {fallback}", stacklevel=3)

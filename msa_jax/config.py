"""Model and MSA configuration: frozen dataclasses, presets, and Hugging Face config.json conversion.

`ModelConfig` holds the Qwen3 backbone dimensions; `MSAConfig` holds the memory-sparse-attention settings
(router layers, top-k, chunk size, reductions, score mode, losses). Both are frozen so they can be
static arguments of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

HEAD_REDUCTIONS = ("mean", "max")
QUERY_REDUCTIONS = ("max", "mean", "last")
CHUNK_REDUCTIONS = ("max", "mean")
SCORE_MODES = ("cosine", "scaled_dot")
AUX_LOSS_METHODS = ("INFONCE", "INFONCE_DECOUPLE", "INFONCE_FOCAL", "INFONCE_DECOUPLE_FOCAL", "BCE")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots_saveable")


class ConfigError(ValueError):
  """A configuration (ours or a Hugging Face config.json) is invalid or unsupported."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Qwen3 decoder dimensions and numerics."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  initializer_range: float = 0.02
  # Std of the token embedding at init (None: initializer_range). A model trained from scratch
  # needs token identity to dominate the residual stream at init, or upper-layer router keys and
  # queries carry no token information to match; 1.0 does that (the tiny synthetic model uses it).
  embedding_init_std: float | None = None
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  scan_layers: bool = False
  remat_policy: str = "none"
  # Tile edge of the blockwise segment attention: large tiles suit small models on GPUs (fewer,
  # bigger kernels), 512 keeps a tile's scores small for wide models.
  attention_block: int = 512

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "attention_block"):
      if int(getattr(self, name)) <= 0:
        raise ConfigError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                        f"({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"ModelConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")

  @property
  def num_groups(self) -> int:
    """Query heads per KV head (GQA group size)."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)


@dataclasses.dataclass(frozen=True)
class MSAConfig:
  """Memory Sparse Attention settings (MSA_PAPER.md §2, MSA_REFERENCE_IMPL.md §1.1).

  `query_position_offset` is the first RoPE position of the question: template head length plus
  `top_k_docs` (the paper's "global RoPE offset by k"); `None` means `template_len + top_k_docs`.
  `decouple_router=False` is the official code's coupled mode (route with content q/K, no router
  projections). `focal_gamma` is a real exponent; the official code passes the positive count there
  for INFONCE_DECOUPLE_FOCAL (a bug we do not reproduce).

  Loss weights (the official total `lm·lm + rec·rec + aux·aux + ans·answer`; a training phase may
  override them): `answer_loss_weight` weighs the CE over the final answer's tokens;
  `rec_loss_weight` is kept for round trips only (see `losses.LossWeights`). The aux loss counts
  the router layers with index >= `aux_loss_min_layer`: 0 (ours) counts every router layer, a
  converted MSA config.json gets num_layers // 2 (the official code hard-codes it).

  `align_doc_id` pads each memory document's body with pad tokens to a multiple of `chunk_size`,
  so its closing `[id]<|im_end|>` is a chunk of its own (the last one, which attends over the whole
  document) rather than sharing chunk means with filler text: a small model can then read the id
  it must write from one pooled chunk. False is the official layout, what converted checkpoints
  were trained on.
  """

  router_layers: tuple[int, ...] = ()
  top_k_docs: int = 16
  chunk_size: int = 64
  head_reduce: str = "mean"
  query_reduce: str = "max"
  chunk_reduce: str = "max"
  score_mode: str = "cosine"
  decouple_router: bool = True
  template_len: int = 3
  query_position_offset: int | None = None
  aux_loss_method: str = "INFONCE_DECOUPLE"
  temperature: float = 0.1
  focal_gamma: float = 2.0
  bce_bias_init: float = -20.0
  lm_loss_weight: float = 1.0
  aux_loss_weight: float = 0.1
  answer_loss_weight: float = 0.0
  rec_loss_weight: float = 0.0
  aux_loss_min_layer: int = 0
  align_doc_id: bool = False

  def __post_init__(self):
    object.__setattr__(self, "router_layers", tuple(sorted({int(i) for i in self.router_layers})))
    checks = (("head_reduce", HEAD_REDUCTIONS), ("query_reduce", QUERY_REDUCTIONS),
              ("chunk_reduce", CHUNK_REDUCTIONS), ("score_mode", SCORE_MODES),
              ("aux_loss_method", AUX_LOSS_METHODS))
    for name, allowed in checks:
      if getattr(self, name) not in allowed:
        raise ConfigError(f"MSAConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if self.top_k_docs <= 0 or self.chunk_size <= 0:
      raise ConfigError(f"top_k_docs and chunk_size must be positive, got {self.top_k_docs}, "
                        f"{self.chunk_size}")
    if any(i < 0 for i in self.router_layers):
      raise ConfigError(f"router layer indices must be >= 0, got {self.router_layers}")
    if self.aux_loss_min_layer < 0:
      raise ConfigError(f"aux_loss_min_layer must be >= 0, got {self.aux_loss_min_layer}")
    if not isinstance(self.align_doc_id, bool):
      raise ConfigError(f"align_doc_id must be a bool, got {self.align_doc_id!r}")

  @property
  def aux_layers(self) -> tuple[int, ...]:
    """The router layers the aux loss counts (a suffix of `router_layers`)."""
    return tuple(i for i in self.router_layers if i >= self.aux_loss_min_layer)

  @property
  def doc_align_to(self) -> int:
    """What a document's body is padded to a multiple of (0: not padded)."""
    return self.chunk_size if self.align_doc_id else 0

  @property
  def question_position(self) -> int:
    """RoPE position of the first question token."""
    if self.query_position_offset is not None:
      return self.query_position_offset
    return self.template_len + self.top_k_docs

  def validate_for(self, model: ModelConfig) -> "MSAConfig":
    bad = [i for i in self.router_layers if i >= model.num_layers]
    if bad:
      raise ConfigError(f"router layers {bad} do not exist in a {model.num_layers}-layer model")
    return self

  def replace(self, **kwargs) -> "MSAConfig":
    return dataclasses.replace(self, **kwargs)


def upper_half(num_layers: int) -> tuple[int, ...]:
  """The paper's router layers: the upper half of the stack (18..35 for 36 layers)."""
  return tuple(range(num_layers // 2, num_layers))


_QWEN3_4B = ModelConfig(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
                        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=5_000_000.0,
                        rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=262144,
                        param_dtype="bfloat16", compute_dtype="bfloat16")
_TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=16, rope_theta=10_000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, max_position_embeddings=4096)

PRESETS: dict[str, tuple[ModelConfig, MSAConfig]] = {
    "tiny": (_TINY, MSAConfig(router_layers=upper_half(4), top_k_docs=2, chunk_size=4)),
    "qwen3-4b": (_QWEN3_4B, MSAConfig(router_layers=())),
    "msa-4b": (_QWEN3_4B, MSAConfig(router_layers=upper_half(36), top_k_docs=16, chunk_size=64,
                                    head_reduce="mean", query_reduce="max", chunk_reduce="max")),
}


def preset(name: str) -> tuple[ModelConfig, MSAConfig]:
  """Returns the (ModelConfig, MSAConfig) preset called `name`."""
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name]


# --------------------------------------------------------------------------- Hugging Face config.json


def _rope_theta(hf: Mapping[str, Any]) -> float:
  """transformers v5 keeps rope theta in `rope_parameters`; v4 at the top level."""
  params = hf.get("rope_parameters") or {}
  if isinstance(params, Mapping) and params.get("rope_theta") is not None:
    return float(params["rope_theta"])
  if hf.get("rope_theta") is not None:
    return float(hf["rope_theta"])
  return 10_000.0


def _parse_router_layers(value: Any, num_layers: int) -> tuple[int, ...]:
  if value is None or value == "all":
    return tuple(range(num_layers))
  if isinstance(value, str):
    parts = [p.strip() for p in value.split(",") if p.strip()]
    try:
      return tuple(int(p) for p in parts)
    except ValueError as e:
      raise ConfigError(f"msa_config.router_layer_idx must be 'all' or a comma list of ints, "
                        f"got {value!r}") from e
  return tuple(int(v) for v in value)


def _as_bool(value: Any) -> bool:
  if isinstance(value, str):
    return value.strip().lower() in ("1", "true", "yes")
  return bool(value)


def official_score_mode(aux_loss_method: str, decouple_router: bool) -> str:
  """The official inference's gating: cosine only when the method is exactly "INFONCE" (with the
  decoupled router); any other method routes by a 1/sqrt(D)-scaled dot product (MSA_REFERENCE_IMPL §1.1)."""
  return "cosine" if (aux_loss_method == "INFONCE" and decouple_router) else "scaled_dot"


def from_hf_config(hf: Mapping[str, Any], *, score_mode: str | None = None,
                   param_dtype: str | None = None,
                   compute_dtype: str = "bfloat16") -> tuple[ModelConfig, MSAConfig]:
  """Reads a plain Qwen3 or an MSA `config.json` dict.

  A plain Qwen3 gets the paper's MSA defaults (router layers = upper half, k=16, P=64). An MSA config
  reproduces the official inference's score gating unless `score_mode` overrides it, and its aux
  loss counts the layers >= num_layers // 2 as the official code's does (unless the file carries our
  `aux_loss_min_layer`, which `to_hf_config` writes). Documents keep the official layout unless
  it carries our `align_doc_id`.
  """
  model_type = hf.get("model_type")
  if model_type not in ("qwen3", "msa"):
    raise ConfigError(f"unsupported model_type {model_type!r}: expected 'qwen3' or 'msa'")
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads")
  missing = [k for k in required if k not in hf]
  if missing:
    raise ConfigError(f"config.json lacks required keys {missing}")
  num_heads = int(hf["num_attention_heads"])
  hidden = int(hf["hidden_size"])
  dtype = param_dtype or str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
  if dtype not in DTYPES:
    raise ConfigError(f"unsupported checkpoint dtype {dtype!r}; expected one of {DTYPES}")
  if hf.get("attention_bias"):
    raise ConfigError("attention_bias=true is not supported (Qwen3 has no q/k/v biases)")
  model = ModelConfig(
      vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
      intermediate_size=int(hf["intermediate_size"]), num_layers=int(hf["num_hidden_layers"]),
      num_heads=num_heads, num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(hf.get("head_dim") or hidden // num_heads), rope_theta=_rope_theta(hf),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
      initializer_range=float(hf.get("initializer_range", 0.02)),
      param_dtype=dtype, compute_dtype=compute_dtype)
  if model_type == "qwen3":
    msa = MSAConfig(router_layers=upper_half(model.num_layers))
  else:
    mc = hf.get("msa_config")
    if not isinstance(mc, Mapping):
      raise ConfigError("model_type 'msa' needs an 'msa_config' dict in config.json")
    method = str(mc.get("aux_loss_method", "INFONCE"))
    decouple = _as_bool(mc.get("decouple_router", False))
    msa = MSAConfig(
        router_layers=_parse_router_layers(mc.get("router_layer_idx", "all"), model.num_layers),
        top_k_docs=int(mc.get("top_k_docs", 2)), chunk_size=int(mc.get("pooling_kernel_size", 2)),
        head_reduce=str(mc.get("head_reduce_method", "max")),
        query_reduce=str(mc.get("query_reduce_method", "max")),
        chunk_reduce=str(mc.get("chunk_reduce_method", "max")),
        score_mode=official_score_mode(method, decouple), decouple_router=decouple,
        aux_loss_method=method, temperature=float(mc.get("infonce_loss_temp", 0.1)),
        lm_loss_weight=float(mc.get("lmloss_weigth", mc.get("lmloss_weight", 1.0))),
        aux_loss_weight=float(mc.get("auxloss_weight", 0.1)),
        answer_loss_weight=float(mc.get("ansloss_weight", 1.0)),
        rec_loss_weight=float(mc.get("recloss_weight", 0.0)),
        aux_loss_min_layer=int(mc.get("aux_loss_min_layer", model.num_layers // 2)),
        align_doc_id=_as_bool(mc.get("align_doc_id", False)))
  if score_mode is not None:
    msa = msa.replace(score_mode=score_mode)
  return model, msa.validate_for(model)


def to_hf_config(model: ModelConfig, msa: MSAConfig | None, *, base: Mapping[str, Any] | None = None,
                 dtype: str | None = None) -> dict[str, Any]:
  """Writes a Hugging Face config.json dict: plain Qwen3 when `msa` is None, else MSA format.

  `base` (the original config.json) keeps keys we do not model, such as token ids.
  """
  out = dict(base or {})
  for stale in ("rope_theta", "torch_dtype", "msa_config", "rope_scaling"):
    out.pop(stale, None)
  out.update({
      "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
      "intermediate_size": model.intermediate_size, "num_hidden_layers": model.num_layers,
      "num_attention_heads": model.num_heads, "num_key_value_heads": model.num_kv_heads,
      "head_dim": model.head_dim, "rms_norm_eps": model.rms_norm_eps,
      "tie_word_embeddings": model.tie_word_embeddings,
      "max_position_embeddings": model.max_position_embeddings,
      "initializer_range": model.initializer_range, "hidden_act": "silu", "attention_bias": False,
      "rope_parameters": {"rope_theta": model.rope_theta, "rope_type": "default"},
      "dtype": dtype or model.param_dtype,
  })
  out.setdefault("layer_types", ["full_attention"] * model.num_layers)
  if len(out["layer_types"]) != model.num_layers:
    out["layer_types"] = ["full_attention"] * model.num_layers
  if msa is None:
    out["model_type"] = "qwen3"
    out["architectures"] = ["Qwen3ForCausalLM"]
    return out
  method = msa.aux_loss_method
  out["model_type"] = "msa"
  out["architectures"] = ["MSAForCausalLM"]
  out["msa_config"] = {
      "router_layer_idx": ",".join(str(i) for i in msa.router_layers),
      "top_k_docs": msa.top_k_docs, "pooling_kernel_size": msa.chunk_size,
      "decouple_router": msa.decouple_router, "aux_loss_method": method,
      "infonce_loss_temp": msa.temperature, "head_reduce_method": msa.head_reduce,
      "query_reduce_method": msa.query_reduce, "chunk_reduce_method": msa.chunk_reduce,
      "lmloss_weigth": msa.lm_loss_weight, "auxloss_weight": msa.aux_loss_weight,
      "ansloss_weight": msa.answer_loss_weight, "recloss_weight": msa.rec_loss_weight,
      "aux_loss_min_layer": msa.aux_loss_min_layer,
  }
  if msa.align_doc_id:  # ours; written only when set, so the official layout exports unchanged
    out["msa_config"]["align_doc_id"] = True
  return out


# --------------------------------------------------------------------------- our own JSON form


def config_to_dict(model: ModelConfig, msa: MSAConfig) -> dict[str, Any]:
  return {"model": dataclasses.asdict(model), "msa": dataclasses.asdict(msa)}


def config_from_dict(d: Mapping[str, Any]) -> tuple[ModelConfig, MSAConfig]:
  try:
    model = ModelConfig(**d["model"])
    msa_d = dict(d["msa"])
    msa_d["router_layers"] = tuple(msa_d.get("router_layers", ()))
    msa = MSAConfig(**msa_d)
  except (KeyError, TypeError) as e:
    raise ConfigError(f"malformed msa_jax config: {e}") from e
  return model, msa.validate_for(model)


def load_config_json(path: str) -> dict[str, Any]:
  """Reads a JSON config file with a clear error for a missing or corrupt file."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise ConfigError(f"missing config file: {path}") from e
  except json.JSONDecodeError as e:
    raise ConfigError(f"corrupt JSON in {path}: {e}") from e

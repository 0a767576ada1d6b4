"""ModelConfig / MSAConfig: presets, validation, Hugging Face config.json in and out."""

import numpy as np
import pytest

from msa_jax import config as cfglib
from msa_jax.checkpoint import convert
from msa_jax.config import ConfigError, MSAConfig, ModelConfig

QWEN3_V5 = {
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936,
    "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "max_position_embeddings": 262144, "dtype": "bfloat16",
    "rope_parameters": {"rope_theta": 5000000.0, "rope_type": "default"}, "bos_token_id": 151643,
}


def test_msa_4b_preset_has_the_paper_dimensions():
  model, msa = cfglib.preset("msa-4b")
  assert (model.num_layers, model.hidden_size, model.num_heads, model.num_kv_heads,
          model.head_dim, model.intermediate_size, model.vocab_size) == (
              36, 2560, 32, 8, 128, 9728, 151936)
  assert model.rope_theta == 5e6 and model.tie_word_embeddings
  assert msa.router_layers == tuple(range(18, 36)) and msa.top_k_docs == 16
  assert msa.chunk_size == 64 and msa.question_position == 3 + 16
  assert cfglib.preset("qwen3-4b")[0] == model
  with pytest.raises(ConfigError, match="unknown preset 'nope'"):
    cfglib.preset("nope")


def test_plain_qwen3_v5_config_reads_rope_parameters():
  model, msa = cfglib.from_hf_config(QWEN3_V5)
  assert model == cfglib.preset("msa-4b")[0].replace(compute_dtype="bfloat16")
  assert msa.router_layers == tuple(range(18, 36)) and msa.score_mode == "cosine"


def test_v4_config_keeps_rope_theta_at_top_level():
  hf = dict(QWEN3_V5, rope_theta=1e6)
  del hf["rope_parameters"]
  assert cfglib.from_hf_config(hf)[0].rope_theta == 1e6


@pytest.mark.parametrize("method,decouple,mode", [
    ("INFONCE", True, "cosine"), ("INFONCE_DECOUPLE", True, "scaled_dot"),
    ("INFONCE_FOCAL", True, "scaled_dot"), ("BCE", True, "scaled_dot"),
    ("INFONCE", False, "scaled_dot")])
def test_msa_config_reproduces_official_score_gating(method, decouple, mode):
  hf = dict(QWEN3_V5, model_type="msa", msa_config={
      "router_layer_idx": "18,19,20", "top_k_docs": 16, "pooling_kernel_size": 64,
      "decouple_router": "true" if decouple else "false", "aux_loss_method": method,
      "head_reduce_method": "mean", "query_reduce_method": "max", "chunk_reduce_method": "max"})
  model, msa = cfglib.from_hf_config(hf)
  assert msa.score_mode == mode and msa.router_layers == (18, 19, 20)
  assert msa.decouple_router == decouple and msa.aux_loss_method == method
  assert cfglib.from_hf_config(hf, score_mode="cosine")[1].score_mode == "cosine"


def test_router_layer_idx_all():
  hf = dict(QWEN3_V5, model_type="msa", msa_config={"router_layer_idx": "all"})
  assert cfglib.from_hf_config(hf)[1].router_layers == tuple(range(36))


def test_hf_config_round_trip():
  model, msa = cfglib.preset("msa-4b")
  msa = msa.replace(aux_loss_method="INFONCE", head_reduce="max", temperature=0.05)
  hf = cfglib.to_hf_config(model, msa, base={"bos_token_id": 7})
  assert hf["model_type"] == "msa" and hf["bos_token_id"] == 7
  model2, msa2 = cfglib.from_hf_config(hf, compute_dtype=model.compute_dtype)
  assert model2 == model
  assert msa2 == msa.replace(score_mode="cosine", answer_loss_weight=msa.answer_loss_weight)
  plain = cfglib.to_hf_config(model, None)
  assert plain["model_type"] == "qwen3" and "msa_config" not in plain


def test_msa_config_json_sets_the_official_loss_fields():
  hf = dict(QWEN3_V5, model_type="msa", msa_config={
      "router_layer_idx": "18,19,20,21", "lmloss_weigth": 1.0, "auxloss_weight": 0.2,
      "recloss_weight": 0.0, "ansloss_weight": 0.5})
  _, msa = cfglib.from_hf_config(hf)
  assert msa.aux_loss_min_layer == 18  # the official aux loss: layers >= 36 // 2
  assert (msa.lm_loss_weight, msa.aux_loss_weight, msa.answer_loss_weight,
          msa.rec_loss_weight) == (1.0, 0.2, 0.5, 0.0)
  hf["num_hidden_layers"] = 40  # router layer 21 < 40 // 2 is not counted
  _, msa = cfglib.from_hf_config(hf)
  assert msa.aux_loss_min_layer == 20 and msa.aux_layers == (20, 21)
  # a plain Qwen3 and our presets count every router layer
  assert cfglib.from_hf_config(QWEN3_V5)[1].aux_loss_min_layer == 0
  assert cfglib.preset("tiny")[1].aux_layers == cfglib.preset("tiny")[1].router_layers


@pytest.mark.parametrize("min_layer", [0, 7, 18])
def test_loss_fields_round_trip_through_hf_config(min_layer):
  model, msa = cfglib.preset("msa-4b")
  msa = msa.replace(aux_loss_min_layer=min_layer, answer_loss_weight=0.25, rec_loss_weight=0.5,
                    score_mode="scaled_dot")
  hf = cfglib.to_hf_config(model, msa)
  assert hf["msa_config"]["aux_loss_min_layer"] == min_layer
  assert hf["msa_config"]["recloss_weight"] == 0.5 and hf["msa_config"]["ansloss_weight"] == 0.25
  assert cfglib.from_hf_config(hf, compute_dtype=model.compute_dtype) == (model, msa)
  assert cfglib.config_from_dict(cfglib.config_to_dict(model, msa)) == (model, msa)


def test_own_json_without_the_new_fields_keeps_defaults():
  model, msa = cfglib.preset("tiny")
  d = cfglib.config_to_dict(model, msa)
  for key in ("aux_loss_min_layer", "rec_loss_weight"):
    del d["msa"][key]
  assert cfglib.config_from_dict(d) == (model, msa)


def test_align_doc_id_round_trips_and_defaults_to_the_official_layout(tmp_path):
  model, msa = cfglib.preset("tiny")
  assert not msa.align_doc_id and msa.doc_align_to == 0
  aligned = msa.replace(align_doc_id=True)
  assert aligned.doc_align_to == msa.chunk_size == 4
  # our JSON: kept; a file from before the field reads as the official layout
  assert cfglib.config_from_dict(cfglib.config_to_dict(model, aligned)) == (model, aligned)
  d = cfglib.config_to_dict(model, aligned)
  del d["msa"]["align_doc_id"]
  assert cfglib.config_from_dict(d) == (model, msa)
  # HF config.json: written only when set (an official export is unchanged), read back
  assert "align_doc_id" not in cfglib.to_hf_config(model, msa)["msa_config"]
  hf = cfglib.to_hf_config(model, aligned)
  assert hf["msa_config"]["align_doc_id"] is True
  assert cfglib.from_hf_config(hf, compute_dtype=model.compute_dtype)[1].align_doc_id
  assert not cfglib.from_hf_config(cfglib.to_hf_config(model, msa))[1].align_doc_id
  official = dict(QWEN3_V5, model_type="msa", msa_config={"router_layer_idx": "18,19"})
  assert not cfglib.from_hf_config(official)[1].align_doc_id
  assert not cfglib.from_hf_config(QWEN3_V5)[1].align_doc_id
  # saved with a checkpoint and loaded back
  out = convert.write_checkpoint_dir(str(tmp_path / "ckpt"), model, aligned,
                                     {"w": np.zeros(2, np.float32)})
  meta, model2, msa2 = convert.read_meta(out)
  assert (model2, msa2) == (model, aligned)
  assert meta["hf_config"]["msa_config"]["align_doc_id"] is True
  with pytest.raises(ConfigError, match="align_doc_id must be a bool"):
    MSAConfig(align_doc_id="yes")


def test_own_json_round_trip():
  model, msa = cfglib.preset("tiny")
  assert cfglib.config_from_dict(cfglib.config_to_dict(model, msa)) == (model, msa)


@pytest.mark.parametrize("hf,match", [
    ({"model_type": "llama"}, "unsupported model_type 'llama'"),
    ({"model_type": "qwen3", "hidden_size": 8}, "lacks required keys"),
    (dict(QWEN3_V5, model_type="msa"), "needs an 'msa_config'"),
    (dict(QWEN3_V5, dtype="int8"), "unsupported checkpoint dtype"),
    (dict(QWEN3_V5, model_type="msa", msa_config={"router_layer_idx": "40"}),
     r"router layers \[40\] do not exist"),
    (dict(QWEN3_V5, model_type="msa", msa_config={"router_layer_idx": "a,b"}),
     "comma list of ints"),
    (dict(QWEN3_V5, model_type="msa", msa_config={"head_reduce_method": "sum"}),
     "head_reduce must be one of"),
])
def test_bad_hf_configs_are_named(hf, match):
  with pytest.raises(ConfigError, match=match):
    cfglib.from_hf_config(hf)


def test_dataclass_validation():
  with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3,
                num_kv_heads=2, head_dim=4)
  with pytest.raises(ConfigError, match="score_mode"):
    MSAConfig(score_mode="dot")
  assert MSAConfig(router_layers=[3, 1, 3]).router_layers == (1, 3)
  with pytest.raises(ConfigError, match="aux_loss_min_layer must be >= 0"):
    MSAConfig(aux_loss_min_layer=-1)

"""Parity with transformers' Qwen3ForCausalLM, and HF <-> msa_jax round trips."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

import msa_jax  # noqa: E402
from msa_jax.checkpoint.convert import hf_to_msa_jax, msa_jax_to_hf  # noqa: E402
from tests.hf_fixtures import (MSA_CONFIG, make_msa, make_qwen3, max_err_on_valid,  # noqa: E402
                               padded_batch, torch_logits)

ATOL = 1e-4


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_transformers(tmp_path, tied, scan_layers):
  hf_dir, ck_dir = str(tmp_path / "hf"), str(tmp_path / "ck")
  hf_model = make_qwen3(hf_dir, tied=tied, rope_theta=1e6)
  hf_to_msa_jax(hf_dir, ck_dir)
  loaded = msa_jax.load(ck_dir, compute_dtype="float32", scan_layers=scan_layers)
  assert loaded.model_config.tie_word_embeddings == tied
  tokens, mask = padded_batch(loaded.model_config.vocab_size)
  ours = loaded.logits(tokens, segment_ids=mask)
  theirs = torch_logits(hf_model, tokens, mask)
  err = max_err_on_valid(ours, theirs, mask)
  print(f"parity tied={tied} scan={scan_layers}: max |logits - transformers| = {err:.3e}")
  assert err < ATOL


def test_load_hf_directory_directly(tmp_path):
  hf_model = make_qwen3(str(tmp_path), seed=3)
  loaded = msa_jax.load(str(tmp_path), compute_dtype="float32")
  tokens, mask = padded_batch(loaded.model_config.vocab_size, seed=1)
  err = max_err_on_valid(loaded.logits(tokens, segment_ids=mask),
                          torch_logits(hf_model, tokens, mask), mask)
  assert err < ATOL
  assert loaded.tokenizer is not None and loaded.tokenizer.im_start_id >= 0


def _assert_same_tensors(a_dir, b_dir, expect_extra=()):
  a, b = load_file(os.path.join(a_dir, "model.safetensors")), load_file(
      os.path.join(b_dir, "model.safetensors"))
  assert set(a) == set(b) - set(expect_extra), sorted(set(a) ^ set(b))
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    assert a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_qwen3_is_bit_identical(tmp_path, dtype):
  src, ck, back = str(tmp_path / "src"), str(tmp_path / "ck"), str(tmp_path / "back")
  make_qwen3(src, dtype=dtype, seed=5)
  hf_to_msa_jax(src, ck)
  msa_jax_to_hf(ck, back)
  _assert_same_tensors(src, back)
  with open(os.path.join(back, "config.json")) as f:
    assert json.load(f)["model_type"] == "qwen3"
  # compare fresh loads: an in-memory model cast with .to(bf16) also casts its RoPE buffer
  original = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=dtype).eval()
  tokens, mask = padded_batch(288, seed=2)
  np.testing.assert_array_equal(torch_logits(reloaded, tokens, mask),
                                torch_logits(original, tokens, mask))


def test_round_trip_sharded_output(tmp_path):
  src, ck, back = str(tmp_path / "src"), str(tmp_path / "ck"), str(tmp_path / "back")
  hf_model = make_qwen3(src, seed=6)
  hf_to_msa_jax(src, ck)
  msa_jax_to_hf(ck, back, max_shard_bytes=64 * 1024)
  assert os.path.exists(os.path.join(back, "model.safetensors.index.json"))
  reloaded = transformers.Qwen3ForCausalLM.from_pretrained(back).eval()
  tokens, mask = padded_batch(288, seed=4)
  np.testing.assert_array_equal(torch_logits(reloaded, tokens, mask),
                                torch_logits(hf_model, tokens, mask))
  # a sharded input converts too, to the same parameters
  ck2 = str(tmp_path / "ck2")
  hf_to_msa_jax(back, ck2)
  a, b = msa_jax.load(ck), msa_jax.load(ck2)
  for x, y in zip(jax_leaves(a.params), jax_leaves(b.params)):
    np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_msa_checkpoint_keeps_router_weights(tmp_path):
  src, ck, back = str(tmp_path / "src"), str(tmp_path / "ck"), str(tmp_path / "back")
  routers = make_msa(src)
  hf_to_msa_jax(src, ck)
  loaded = msa_jax.load(ck)
  assert loaded.msa_config.router_layers == (2, 3)
  assert loaded.msa_config.top_k_docs == MSA_CONFIG["top_k_docs"]
  assert loaded.msa_config.chunk_size == MSA_CONFIG["pooling_kernel_size"]
  # INFONCE_DECOUPLE routes by scaled dot product at inference in the official code
  assert loaded.msa_config.score_mode == "scaled_dot"
  for i in (2, 3):
    attn = loaded.params[f"layers_{i}"]["attn"]
    for kind, heads in (("q", 4), ("k", 2)):
      hf_w = routers[f"model.layers.{i}.self_attn.router_{kind}_proj.0.weight"]
      ours = np.asarray(attn[f"router_{kind}"]["kernel"])
      assert ours.shape == (64, heads, 16)
      np.testing.assert_array_equal(ours.reshape(64, -1), hf_w.T)
  for i in (0, 1):
    assert "router_q" not in loaded.params[f"layers_{i}"]["attn"]
  msa_jax_to_hf(ck, back)
  _assert_same_tensors(src, back)
  with open(os.path.join(back, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["model_type"] == "msa"
  assert cfg["msa_config"]["router_layer_idx"] == "2,3"
  # the MSA directory still loads in transformers as a Qwen3 (router weights ignored)
  hf_qwen3 = transformers.Qwen3ForCausalLM.from_pretrained(back).eval()
  assert hf_qwen3 is not None


def test_plain_qwen3_gets_initialised_router_weights(tmp_path):
  src, ck = str(tmp_path / "src"), str(tmp_path / "ck")
  make_qwen3(src)
  hf_to_msa_jax(src, ck, seed=7)
  loaded = msa_jax.load(ck)
  assert loaded.msa_config.router_layers == (2, 3)  # upper half of 4 layers
  w = np.asarray(loaded.params["layers_3"]["attn"]["router_q"]["kernel"])
  assert w.shape == (64, 4, 16)
  assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002

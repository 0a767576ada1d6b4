"""The bank and queries shared by the two-process routing test and its workers."""

import numpy as np

from msa_jax import config as cfglib
from tests.bank_fixtures import random_bank

CFG = cfglib.MSAConfig(router_layers=(0,), top_k_docs=3)
COUNTS = [1, 7, 2, 1, 3, 1, 2]  # documents of different lengths; 4 shards hold 1-2 each (< k)
HKV, D, H = 2, 8, 4


def bank():
  return random_bank(11, COUNTS, HKV, D, ties=[(0, 3)])


def queries():
  rng = np.random.default_rng(12)
  q_r = rng.standard_normal((4, 3, H, D)).astype(np.float32)
  q_r[0, 1] = np.repeat(bank().arrays["router_keys"][0, 0], H // HKV, axis=0)  # documents 0, 3 tie
  return q_r, rng.random((4, 3)) < 0.7

"""Teacher-forced probe of a trained model on held-out synthetic records: accuracy and mean
log-probability per target-token class (format, id digits, answer, the retrieve-or-stop
decision), normally, with the gold text
appended and with the gold documents forced into the selection (see msa_jax/training/probe.py).

  python tools/probe.py --model=models/tiny_msa --task=fact_lookup --memory_tokens=16384 \
      --num_samples=32 --seed=12345 --out=/tmp/probe.json

Records are drawn as training draws them (document lengths and display ids from the model's
train_config.json when it has one; no cap on documents, so the memory holds --memory_tokens), from
--seed, which training must not have used.
"""

import json
import os
import sys
import time

from absl import app, flags

import msa_jax
from msa_jax.cli import quiet_library_logs
from msa_jax.data.transcript import document_length_fn
from msa_jax.training.data_setup import SyntheticRecords
from msa_jax.training.probe import format_table, probe
from msa_jax.training.train_config import DataConfig, TrainConfigError, load_train_config

_MODEL = flags.DEFINE_string("model", None, "Trained msa_jax checkpoint directory.", required=True)
_TASK = flags.DEFINE_enum("task", "fact_lookup", ["fact_lookup", "multi_hop", "niah_single"],
                          "Synthetic task of the held-out records.")
_MEMORY = flags.DEFINE_integer("memory_tokens", 16384, "Memory tokens per record.")
_NUM = flags.DEFINE_integer("num_samples", 64, "Held-out records (each gives its retrieval steps "
                            "and its answer step).")
_SEED = flags.DEFINE_integer("seed", 12345, "Seed of the held-out records (not a training seed).")
_DOC_ID_MAX = flags.DEFINE_integer("doc_id_max", None, "Random display ids below this (0: ids "
                                   "0..n-1); default: the model's train_config.json's.")
_MIN_DOC = flags.DEFINE_integer("min_doc_tokens", None, "Shortest document; default: the model's "
                                "train_config.json's.")
_MAX_DOC = flags.DEFINE_integer("max_doc_tokens", None, "Longest document; default: the model's "
                                "train_config.json's (without one, the training defaults: "
                                "probing a model on documents longer than it trained on measures "
                                "something else).")
_NAME_NEG = flags.DEFINE_integer("name_negatives", 0, "Distractors that are near-namesakes of a "
                                 "gold subject (fact_lookup, multi_hop).")
_MISS_RATE = flags.DEFINE_float("miss_rate", 0.0, "Miss rounds (a wrong card injected before a "
                                "hop's round; data.miss_rate): the after_miss steps measure "
                                "whether the model retrieves again (fact_lookup, multi_hop).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Records whose prompts are scored together.")
_BLOCK = flags.DEFINE_integer("attention_block", 128, "Tile edge of the blockwise attention (speed "
                              "only: small tiles skip more of a row of short documents on CPU).")
_TOP_K = flags.DEFINE_integer("top_k_docs", None, "Documents each router layer selects (default: "
                              "the model's top_k_docs).", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Write the JSON results here (atomically).")


def _data_config(model_dir: str) -> tuple[DataConfig, str]:
  """The data settings the model was trained with (defaults without a train_config.json), and
  where they came from."""
  path = os.path.join(model_dir, "train_config.json")
  if os.path.exists(path):
    return load_train_config(path).data, path
  return DataConfig(), f"the training defaults (no train_config.json in {model_dir})"


def _write_json(result: dict, path: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def main(argv):
  del argv
  quiet_library_logs()
  if min(_MEMORY.value, _NUM.value, _BATCH.value, _BLOCK.value) <= 0:
    sys.exit("probe: --memory_tokens, --num_samples, --batch_size and --attention_block must be "
             "positive")
  if _OUT.value and not os.path.isdir(os.path.dirname(os.path.abspath(_OUT.value))):
    sys.exit(f"probe: the directory of --out={_OUT.value} does not exist")
  if not os.path.isdir(_MODEL.value):
    sys.exit(f"probe: no model directory at {_MODEL.value}")
  try:
    loaded = msa_jax.load(_MODEL.value, top_k_docs=_TOP_K.value)
    loaded.model_config = loaded.model_config.replace(attention_block=_BLOCK.value)
    if loaded.tokenizer is None:
      raise ValueError(f"{_MODEL.value} has no tokenizer.json")
    data, source_of = _data_config(_MODEL.value)
    doc_tokens = (data.min_doc_tokens if _MIN_DOC.value is None else _MIN_DOC.value,
                  data.max_doc_tokens if _MAX_DOC.value is None else _MAX_DOC.value)
    if not 0 < doc_tokens[0] <= doc_tokens[1]:
      raise ValueError(f"documents of {doc_tokens[0]}-{doc_tokens[1]} tokens: need "
                       f"0 < --min_doc_tokens <= --max_doc_tokens")
    print(f"documents of {doc_tokens[0]}-{doc_tokens[1]} tokens"
          + ("" if (_MIN_DOC.value, _MAX_DOC.value) == (None, None) else " (flags)")
          + f"; data settings from {source_of}", flush=True)
    tokenizer = loaded.tokenizer
    doc_id_max = data.doc_id_max if _DOC_ID_MAX.value is None else _DOC_ID_MAX.value
    align_to = loaded.msa_config.doc_align_to
    source = SyntheticRecords(((_TASK.value, 1.0),), _SEED.value, _NUM.value, _MEMORY.value,
                              *doc_tokens, None,
                              document_length_fn(tokenizer, align_to), doc_id_max, align_to,
                              name_negatives=_NAME_NEG.value, miss_rate=_MISS_RATE.value)
    records = [source[i] for i in range(_NUM.value)]
    start = time.perf_counter()
    result = probe(loaded.model, loaded.params, tokenizer, records, batch_size=_BATCH.value,
                   progress=lambda done, total: print(f"{done}/{total} records", flush=True))
  except (ValueError, TrainConfigError) as e:  # a bad checkpoint, config or setting
    sys.exit(f"probe: {e}")
  result["settings"] = {"model": _MODEL.value, "task": _TASK.value,
                        "memory_tokens": _MEMORY.value, "num_samples": _NUM.value,
                        "seed": _SEED.value, "doc_id_max": doc_id_max,
                        "doc_tokens": list(doc_tokens), "name_negatives": _NAME_NEG.value,
                        "miss_rate": _MISS_RATE.value,
                        "top_k_docs": loaded.msa_config.top_k_docs,
                        "seconds": round(time.perf_counter() - start, 1)}
  print(format_table(result))
  if _OUT.value:
    _write_json(result, _OUT.value)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

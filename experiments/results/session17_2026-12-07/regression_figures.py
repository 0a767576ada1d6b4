"""The figures tests/test_shipped_model.py sets its floors between, for any model directory (the
shipped one and the one it replaces), on the test's own held-out questions.

  python experiments/results/session17_2026-12-07/regression_figures.py MODEL [MODEL ...]
"""

import json
import sys

import msa_jax
from msa_jax.evaluation import EvalShapes, evaluate_records
from msa_jax.training.probe import probe
from tests.test_shipped_model import _held_out


def figures(model_dir: str) -> dict:
  loaded = msa_jax.load(model_dir)
  tok, align_to = loaded.tokenizer, loaded.msa_config.doc_align_to
  facts = probe(loaded.model, loaded.params, tok, _held_out(tok, "fact_lookup", 16, align_to),
                batch_size=16)["metrics"]["normal"]
  chains = probe(loaded.model, loaded.params, tok, _held_out(tok, "multi_hop", 8, align_to),
                 batch_size=16)
  longer = probe(loaded.model, loaded.params, tok,
                 _held_out(tok, "fact_lookup", 16, align_to, max_doc_tokens=224),
                 batch_size=16)["metrics"]["normal"]["answer"]["answer"]
  shapes = EvalShapes(seq_len_mem=1024, max_docs=64, seq_len_prompt=256)
  em = evaluate_records(loaded.model, loaded.params, tok,
                        _held_out(tok, "fact_lookup", 24, align_to), shapes, batch_size=8)
  return {"fact answer acc": facts["answer"]["answer"]["accuracy"],
          "fact answer logprob": facts["answer"]["answer"]["mean_logprob"],
          "fact id-digit acc": facts["retrieval"]["id_digits"]["accuracy"],
          "fact id-digit logprob": facts["retrieval"]["id_digits"]["mean_logprob"],
          "multi-hop answer logprob": chains["metrics"]["normal"]["answer"]["answer"]["mean_logprob"],
          "multi-hop router recall@1": min(chains["router_recall@1"]["retrieval"].values()),
          "fact EM (24)": em["summary"]["all"]["exact_match"],
          "long docs answer acc": longer["accuracy"],
          "long docs answer logprob": longer["mean_logprob"]}


if __name__ == "__main__":
  print(json.dumps({m: figures(m) for m in sys.argv[1:]}, indent=1))

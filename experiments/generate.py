"""Greedy generation from a checkpoint (msa_jax or Hugging Face directory) for a text prompt.

  python experiments/generate.py --checkpoint=/tmp/tiny_msa --prompt="Hello" --max_new_tokens=8
"""

from absl import app, flags

import msa_jax
from msa_jax.inference.greedy import greedy_generate
from msa_jax.cli import quiet_library_logs

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory.", required=True)
_PROMPT = flags.DEFINE_string("prompt", "Hello, memory!", "Prompt text.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 16, "Tokens to generate.")


def main(argv):
  del argv
  quiet_library_logs()
  loaded = msa_jax.load(_CHECKPOINT.value)
  if loaded.tokenizer is None:
    raise app.UsageError(f"{_CHECKPOINT.value} has no tokenizer.json")
  prompt_ids = loaded.tokenizer.encode(_PROMPT.value)
  new_ids = greedy_generate(loaded, prompt_ids, _MAX_NEW_TOKENS.value,
                            stop_ids=(loaded.tokenizer.im_end_id,))
  print(f"prompt ids: {prompt_ids}")
  print(f"generated ids: {new_ids}")
  print(f"generated text: {loaded.tokenizer.decode(new_ids)!r}")


if __name__ == "__main__":
  app.run(main)

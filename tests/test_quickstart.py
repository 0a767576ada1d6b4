"""The README's first quick-start command, end to end: random checkpoint -> convert -> generate.

The binary's output is checked against transformers' Qwen3 run on the Hugging Face checkpoint the
script wrote (before our converter touched it), so neither our conversion nor our forward checks itself.
"""

import ast
import os
import re
import subprocess

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Hello, memory!"  # what experiments/quickstart.sh asks
MAX_NEW_TOKENS = 8


def _printed_ids(stdout: str, label: str) -> list[int]:
  match = re.search(rf"^{label} ids: (\[.*\])$", stdout, re.MULTILINE)
  assert match, f"no '{label} ids:' line in:\n{stdout}"
  return ast.literal_eval(match.group(1))


def _transformers_greedy(hf_dir: str, prompt_ids: list[int], n: int, stop_id: int) -> list[int]:
  """Greedy continuation by transformers in float32: a forward that shares no code with ours."""
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  ids, out = list(prompt_ids), []
  for _ in range(n):
    with torch.no_grad():
      logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    token = int(torch.argmax(logits))
    out.append(token)
    if token == stop_id:
      break
    ids.append(token)
  return out


def test_quickstart_script(tmp_path):
  result = subprocess.run(["bash", os.path.join(ROOT, "experiments", "quickstart.sh"),
                           str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  hf_dir = str(tmp_path / "hf")
  tok = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
  prompt_ids = _printed_ids(result.stdout, "prompt")
  assert prompt_ids == tok.encode(PROMPT, add_special_tokens=False).ids
  generated = _printed_ids(result.stdout, "generated")
  assert 0 < len(generated) <= MAX_NEW_TOKENS
  want = _transformers_greedy(hf_dir, prompt_ids, MAX_NEW_TOKENS, tok.token_to_id("<|im_end|>"))
  assert generated == want

"""A small word-level tokenizer for the synthetic world, built by code.

Text is cut into pieces by one regex: a run of letters with its optional leading space (` city`),
a single digit, or any other single character (punctuation, a space, a newline). Each piece is one
token of a `WordLevel` model whose vocabulary holds every world word with a leading space, the words
that can also appear without one (`world.bare_words()`), the ten digits, printable ASCII punctuation,
space and newline; the decoder concatenates the pieces, so `decode(encode(text)) == text` for every
text made of world words. A word outside the world becomes `<unk>`. MSA's special tokens are added
tokens, so `<|im_start|>user\\n` is three tokens.

A piece is one token whatever it is, so `count_tokens` (a Python regex count) gives the exact token
length of any text without the tokenizer; the generators use it to size documents.
"""

from __future__ import annotations

import os
import re
import string
import tempfile

import tokenizers

from msa_jax.data import prompt_format
from msa_jax.data.synthetic import world
from msa_jax.data.tokenizer import MSA_SPECIAL_TOKENS, Tokenizer

UNK = "<unk>"
SPECIAL_TOKENS = MSA_SPECIAL_TOKENS + (prompt_format.END_OF_RETRIEVE,)
PIECE_PATTERN = r" ?[A-Za-z]+|[0-9]|[^A-Za-z0-9]"
_PIECE_RE = re.compile(PIECE_PATTERN)


def count_tokens(text: str) -> int:
  """The number of world-tokenizer tokens of `text` (with no special-token strings in it)."""
  return len(_PIECE_RE.findall(text))


def world_vocab() -> dict[str, int]:
  """Token -> id of the word-level model (the special tokens come after it)."""
  pieces = [UNK, " ", "\n"] + list(string.digits)
  pieces += [c for c in string.punctuation]
  pieces += [" " + w for w in world.all_words()]
  pieces += list(world.bare_words())
  return {p: i for i, p in enumerate(dict.fromkeys(pieces))}


def build_world_tokenizer() -> tokenizers.Tokenizer:
  """The world tokenizer, built by code (see the module docstring)."""
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(world_vocab(), unk_token=UNK))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(
      tokenizers.Regex(PIECE_PATTERN), behavior="isolated")
  tok.decoder = tokenizers.decoders.Fuse()
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return tok


def save_world_tokenizer(path: str) -> str:
  """Writes the world tokenizer as `tokenizer.json` (into `path` if it is a directory), atomically
  (a temporary file renamed into place). Returns the file's path."""
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tokenizer.", suffix=".json.tmp", dir=directory)
  os.close(fd)
  try:
    build_world_tokenizer().save(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def world_tokenizer() -> Tokenizer:
  """The world tokenizer in our `Tokenizer` wrapper (pads with `<|endoftext|>`); a fresh object."""
  return Tokenizer(build_world_tokenizer(), source="(synthetic world)")

"""A thin wrapper over the `tokenizers` library with MSA's special tokens looked up by string.

MSA's protocol depends on a few special tokens: `<|im_start|>`/`<|im_end|>` frame the chat template,
`<|object_ref_end|>` ends a Memory Interleave round, and the pad token (`<|endoftext|>` for Qwen) fills
rows. A tokenizer lacking one fails with an error naming the missing token when it is needed.

Those control tokens must come from the protocol only, never from content: a document or question
holding the string `<|im_end|>` or `[3]<|object_ref_end|>` would otherwise end a round or fake a
retrieval. So user text is tokenized with every added token as plain text (`encode_plain`,
`encode_filled`), by a copy of the tokenizer without added tokens (the library's
`encode_special_tokens` would still match added tokens not marked special).
"""

from __future__ import annotations

import functools
import json
import os
import re

import tokenizers

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
OBJECT_REF_END = "<|object_ref_end|>"
ENDOFTEXT = "<|endoftext|>"
MSA_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, OBJECT_REF_END)
CONTENT = "\ue000"  # (a private-use character) marks where user text goes in a protocol template


class MissingSpecialTokenError(KeyError):
  """The tokenizer has no token for a special string the caller needs."""

  def __str__(self):
    return self.args[0]


class Tokenizer:
  """Text <-> token ids. `pad_token` names the padding token (Qwen pads with `<|endoftext|>`)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, pad_token: str = ENDOFTEXT, source: str = ""):
    self._tok = tokenizer
    self.pad_token = pad_token
    self.source = source

  @classmethod
  def from_file(cls, path: str, pad_token: str = ENDOFTEXT) -> "Tokenizer":
    """Loads `tokenizer.json`, or the one inside a checkpoint directory."""
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no tokenizer file at {path}")
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
      raise ValueError(f"corrupt tokenizer file {path}: {e}") from e
    return cls(tok, pad_token=pad_token, source=path)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of protocol `text`; special-token strings inside it map to their ids, nothing is
    added. For user text use `encode_plain` or `encode_filled`."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)` and each token's character span in `text`, to tell which part of a text a
    token came from (a token may straddle two parts)."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  @functools.cached_property
  def _plain(self) -> tokenizers.Tokenizer:
    spec = json.loads(self._tok.to_str())
    spec["added_tokens"] = []
    return tokenizers.Tokenizer.from_str(json.dumps(spec))

  @functools.cached_property
  def _added(self) -> re.Pattern:
    contents = sorted((t.content for t in self._tok.get_added_tokens_decoder().values()), key=len,
                      reverse=True)
    return re.compile("|".join(map(re.escape, contents)) or "(?!)")

  def encode_plain(self, text: str) -> list[int]:
    """Token ids of user text: special-token strings inside it are plain text."""
    return self._plain.encode(text, add_special_tokens=False).ids

  def encode_filled(self, template: str, content: str) -> list[int]:
    """Ids of protocol `template` with user `content` at its one `CONTENT` mark: the template's
    special tokens are control tokens, those in `content` plain text. Added tokens split a text
    before anything else, so this equals `encode(template with content)` when the content holds
    none."""
    before, after = template.split(CONTENT)  # (a ValueError unless exactly one mark)
    head = max((m.end() for m in self._added.finditer(before)), default=0)
    tail = next((m.start() for m in self._added.finditer(after)), len(after))
    return (self.encode(before[:head]) + self.encode_plain(before[head:] + content + after[:tail])
            + self.encode(after[tail:]))

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Text of `ids`; special tokens are kept by default (Memory Interleave parses them)."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_id(self, token: str) -> int:
    """The id of a special token string, or MissingSpecialTokenError naming it."""
    tid = self._tok.token_to_id(token)
    if tid is None:
      raise MissingSpecialTokenError(
          f"tokenizer {self.source or '(in memory)'} has no token {token!r}; MSA needs "
          f"{', '.join(MSA_SPECIAL_TOKENS)}")
    return tid

  @property
  def im_start_id(self) -> int:
    return self.token_id(IM_START)

  @property
  def im_end_id(self) -> int:
    return self.token_id(IM_END)

  @property
  def object_ref_end_id(self) -> int:
    return self.token_id(OBJECT_REF_END)

  @property
  def pad_id(self) -> int:
    return self.token_id(self.pad_token)

  def require_msa_tokens(self) -> None:
    """Raises if any token the MSA protocol needs is missing."""
    for token in (IM_START, IM_END, OBJECT_REF_END, self.pad_token):
      self.token_id(token)


def build_byte_tokenizer(extra_special_tokens=()) -> tokenizers.Tokenizer:
  """A byte-level tokenizer (256 byte tokens, no merges) plus MSA's special tokens, built by code.

  Small enough for tiny test models; any text round-trips exactly.
  """
  byte_chars = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
  model = tokenizers.models.BPE(vocab=vocab, merges=[])
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(list(MSA_SPECIAL_TOKENS) + list(extra_special_tokens))
  return tok

"""The tokenizers wrapper: round trips, special tokens by string, clear errors."""

import pytest
import tokenizers

from msa_jax.data.tokenizer import (MissingSpecialTokenError, Tokenizer, build_byte_tokenizer)


def test_byte_tokenizer_round_trips_text_and_special_tokens(tmp_path):
  build_byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
  tok = Tokenizer.from_file(str(tmp_path))  # a checkpoint directory works too
  text = "Ünïcode [12]. doc<|object_ref_end|>\n<|im_start|>user"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.object_ref_end_id in ids and tok.im_start_id in ids
  assert tok.decode(ids, skip_special_tokens=True) == "Ünïcode [12]. doc\nuser"
  assert {tok.pad_id, tok.im_start_id, tok.im_end_id, tok.object_ref_end_id} == {256, 257, 258, 259}
  tok.require_msa_tokens()


def test_missing_special_token_is_named(tmp_path):
  bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
  bare.add_special_tokens(["<|im_start|>"])
  tok = Tokenizer(bare, source="bare")
  assert tok.im_start_id == 2
  with pytest.raises(MissingSpecialTokenError, match=r"has no token '<\|object_ref_end\|>'"):
    _ = tok.object_ref_end_id
  with pytest.raises(MissingSpecialTokenError, match="<|im_end|>"):
    tok.require_msa_tokens()
  with pytest.raises(MissingSpecialTokenError, match="'<pad>'"):
    _ = Tokenizer(bare, pad_token="<pad>").pad_id


def test_missing_or_corrupt_tokenizer_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer file"):
    Tokenizer.from_file(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="corrupt tokenizer file"):
    Tokenizer.from_file(str(tmp_path / "tokenizer.json"))

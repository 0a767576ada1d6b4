"""The progress log of long evaluations: records read back as written, a torn last line (a kill in
the middle of a write) cut off, and a log of other settings or of something else refused."""

import pytest

from msa_jax.jsonl_log import JsonlLog


def test_records_round_trip_and_a_torn_line_is_cut(tmp_path):
  path = tmp_path / "log.jsonl"
  log = JsonlLog(str(path), {"model": "m", "rounds": (1, 2)})
  assert log.read() == []
  log.append({"index": 0, "text": "café ☃"})
  log.append({"index": 1})
  assert log.read() == [{"index": 0, "text": "café ☃"}, {"index": 1}]
  with open(path, "ab") as f:
    f.write(b'{"index": 2, "te')  # killed mid-write
  assert log.read() == [{"index": 0, "text": "café ☃"}, {"index": 1}]
  log.append({"index": 2})
  assert [r["index"] for r in log.read()] == [0, 1, 2]
  assert path.read_text().count("\n") == 4  # the header and three whole records


def test_other_settings_or_other_files_are_refused(tmp_path):
  path = tmp_path / "log.jsonl"
  JsonlLog(str(path), {"model": "m", "bank": "b"}).append({"index": 0})
  with pytest.raises(ValueError, match=r"log.jsonl holds the progress of a run under other "
                                       r"settings \(model: 'm' there, 'n' now\); remove it"):
    JsonlLog(str(path), {"model": "n", "bank": "b"}).read()
  path.write_text("not json\n")
  with pytest.raises(ValueError, match=r"log.jsonl:1: not a JSON record"):
    JsonlLog(str(path), {}).read()

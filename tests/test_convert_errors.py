"""Bad input to the checkpoint converter: every case raises a CheckpointError that names the problem,
and leaves nothing behind (no output directory, no temporary `.<name>.tmp-*` sibling).

Tiny valid checkpoints are written once per module and copied into each test, which damages its copy.
"""

import glob
import json
import os
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import msa_jax
from msa_jax.checkpoint import convert
from msa_jax.checkpoint.convert import hf_to_msa_jax, msa_jax_to_hf
from msa_jax.checkpoint.errors import CheckpointError
from msa_jax.checkpoint.safetensors_dir import INDEX_FILE, SINGLE_FILE
from tests.binary_runner import run_python
from tests.hf_fixtures import make_msa, make_qwen3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UP_PROJ_1 = "model.layers.1.mlp.up_proj.weight"
ROUTER_K_3 = "model.layers.3.self_attn.router_k_proj.0.weight"


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """Valid sources: a plain Qwen3, an MSA checkpoint, its msa_jax conversion, and a sharded HF copy."""
  root = tmp_path_factory.mktemp("pristine")
  dirs = {name: str(root / name) for name in ("qwen3", "msa", "ckpt", "sharded")}
  make_qwen3(dirs["qwen3"])
  make_msa(dirs["msa"])
  hf_to_msa_jax(dirs["msa"], dirs["ckpt"])
  msa_jax_to_hf(dirs["ckpt"], dirs["sharded"], max_shard_bytes=64 * 1024)
  assert os.path.exists(os.path.join(dirs["sharded"], INDEX_FILE))
  assert len(_shards(dirs["sharded"])) > 2
  return dirs


@pytest.fixture
def src(pristine, tmp_path):
  """src(kind): this test's own copy of a pristine checkpoint, free to damage."""

  def copy(kind: str) -> str:
    dst = str(tmp_path / "src" / kind)
    shutil.copytree(pristine[kind], dst)
    return dst

  return copy


@pytest.fixture
def out(tmp_path):
  """An output path whose (existing, empty) parent holds nothing else, so leftovers show."""
  parent = tmp_path / "outputs"
  parent.mkdir()
  return str(parent / "converted")


def mentions(*parts) -> str:
  """A `match=` regex that requires every part, verbatim, anywhere in the message."""
  return "(?s)" + "".join(f"(?=.*{re.escape(str(p))})" for p in parts)


def assert_nothing_written(out: str) -> None:
  assert not os.path.lexists(out), f"{out} was created"
  leftovers = os.listdir(os.path.dirname(out))
  assert leftovers == [], f"left behind next to the output: {leftovers}"


def _shards(hf_dir: str) -> list[str]:
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "model-*.safetensors")))


def edit_tensors(hf_dir: str, edit) -> None:
  """Rewrites model.safetensors after `edit(dict of name -> array)`."""
  path = os.path.join(hf_dir, SINGLE_FILE)
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def edit_json(path: str, edit) -> None:
  with open(path) as f:
    obj = json.load(f)
  edit(obj)  # (in place)
  with open(path, "w") as f:
    json.dump(obj, f)


def write_bytes(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def truncate(path: str, keep: int) -> None:
  with open(path, "r+b") as f:
    f.truncate(keep)


# --------------------------------------------------------------------------- controls


@pytest.mark.parametrize("kind", ["qwen3", "msa", "sharded"])
def test_pristine_sources_convert(src, out, kind):
  """The undamaged copies convert, so each failure below is due to its damage alone."""
  assert hf_to_msa_jax(src(kind), out) == out
  assert os.path.exists(os.path.join(out, convert.CONFIG_FILE))
  assert os.listdir(os.path.dirname(out)) == ["converted"]


def test_plain_qwen3_without_routers_gets_random_ones(src, out):
  q = src("qwen3")
  assert not any("router" in n for n in load_file(os.path.join(q, SINGLE_FILE)))
  hf_to_msa_jax(q, out)
  params = convert.restore_tree(out)["params"]
  assert params["layers_3"]["attn"]["router_k"]["kernel"].shape == (64, 2, 16)


# --------------------------------------------------------------------------- tensors


def test_non_finite_weights_are_refused_unless_allowed(src, out):
  q = src("qwen3")

  def poison(tensors):
    tensors[UP_PROJ_1] = tensors[UP_PROJ_1].copy()
    tensors[UP_PROJ_1][0, :2] = [np.nan, np.inf]

  edit_tensors(q, poison)
  with pytest.raises(CheckpointError, match=mentions(q, f"tensor {UP_PROJ_1} holds 2 non-finite "
                                                        f"values", "--allow_nonfinite")):
    hf_to_msa_jax(q, out)
  assert_nothing_written(out)
  hf_to_msa_jax(q, out, allow_nonfinite=True)
  back = os.path.join(os.path.dirname(out), "back")
  with pytest.raises(CheckpointError, match=mentions(out, "layers_1/mlp/up_proj/kernel holds 2 "
                                                          "non-finite values")):
    msa_jax_to_hf(out, back)
  msa_jax_to_hf(out, back, allow_nonfinite=True)


def test_a_flipped_byte_in_the_params_is_detected(src, out):
  ck = src("ckpt")
  params = os.path.join(ck, convert.PARAMS_DIR)
  data = max(glob.glob(os.path.join(params, "ocdbt.process_0", "d", "*")), key=os.path.getsize)
  with open(data, "r+b") as f:
    f.seek(os.path.getsize(data) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  name = os.path.relpath(data, params)
  with pytest.raises(CheckpointError, match=mentions(f"cannot restore {params}: it is damaged",
                                                     f"{name} does not match its checksum")):
    msa_jax_to_hf(ck, out)
  with pytest.raises(CheckpointError, match=mentions(f"{name} does not match its checksum")):
    msa_jax.load(ck)


def test_missing_tensor(src, out):
  q = src("qwen3")
  edit_tensors(q, lambda t: t.pop(UP_PROJ_1))
  with pytest.raises(CheckpointError, match=mentions(q, "missing tensors (1)", UP_PROJ_1)) as e:
    hf_to_msa_jax(q, out)
  assert "unexpected" not in str(e.value) and "shape" not in str(e.value)
  assert_nothing_written(out)


def test_msa_checkpoint_missing_router_weight(src, out):
  m = src("msa")
  edit_tensors(m, lambda t: t.pop(ROUTER_K_3))
  with pytest.raises(CheckpointError, match=mentions(m, "missing tensors (1)", ROUTER_K_3)):
    hf_to_msa_jax(m, out)
  assert_nothing_written(out)


def test_missing_tensors_are_all_listed(src, out):
  m = src("msa")
  gone = [UP_PROJ_1, ROUTER_K_3, "model.norm.weight"]
  edit_tensors(m, lambda t: [t.pop(n) for n in gone])
  with pytest.raises(CheckpointError, match=mentions("missing tensors (3)", *gone)):
    hf_to_msa_jax(m, out)
  assert_nothing_written(out)


@pytest.mark.parametrize("name,got,want", [
    ("model.layers.0.self_attn.k_proj.weight", (48, 64), (32, 64)),
    ("model.layers.2.self_attn.router_q_proj.0.weight", (64, 32), (64, 64)),
    ("model.norm.weight", (64, 1), (64,)),
])
def test_wrong_shape(src, out, name, got, want):
  m = src("msa")

  def edit(t):
    assert t[name].shape == want
    t[name] = np.zeros(got, np.float32)

  edit_tensors(m, edit)
  with pytest.raises(CheckpointError,
                     match=mentions(m, f"tensor {name} has shape {list(got)}, expected {list(want)}")):
    hf_to_msa_jax(m, out)
  assert_nothing_written(out)


def test_unexpected_tensor_names(src, out):
  q = src("qwen3")
  extra = ["model.layers.0.self_attn.extra_proj.weight", "model.layers.7.mlp.up_proj.weight"]
  edit_tensors(q, lambda t: t.update({n: np.ones((4, 4), np.float32) for n in extra}))
  with pytest.raises(CheckpointError, match=mentions(q, "unexpected tensors (2)", *extra)):
    hf_to_msa_jax(q, out)
  assert_nothing_written(out)


# --------------------------------------------------------------------------- config.json


def test_unknown_model_type(src, out):
  q = src("qwen3")
  edit_json(os.path.join(q, "config.json"), lambda c: c.update(model_type="llama"))
  with pytest.raises(CheckpointError, match=mentions(os.path.join(q, "config.json"),
                                                     "unsupported model_type 'llama'")):
    hf_to_msa_jax(q, out)
  assert_nothing_written(out)


def test_missing_config_json(src, out):
  q = src("qwen3")
  os.remove(os.path.join(q, "config.json"))
  with pytest.raises(CheckpointError,
                     match=mentions("missing config file", os.path.join(q, "config.json"))):
    hf_to_msa_jax(q, out)
  assert_nothing_written(out)


@pytest.mark.parametrize("content,problem", [
    (b'{"model_type": "qwen3", "hidden_size": ', "corrupt JSON"),
    (b"\x89\xff\x00garbage\xfe", "corrupt JSON"),
    (b"[1, 2, 3]", "must hold a JSON object, got list"),
], ids=["truncated_json", "binary", "json_list"])
def test_corrupt_config_json(src, out, content, problem):
  q = src("qwen3")
  write_bytes(os.path.join(q, "config.json"), content)
  with pytest.raises(CheckpointError, match=mentions(problem, os.path.join(q, "config.json"))):
    hf_to_msa_jax(q, out)
  assert_nothing_written(out)


def test_config_json_lacking_required_keys(src, out):
  q = src("qwen3")
  edit_json(os.path.join(q, "config.json"), lambda c: c.pop("hidden_size"))
  with pytest.raises(CheckpointError, match=mentions(os.path.join(q, "config.json"),
                                                     "lacks required keys ['hidden_size']")):
    hf_to_msa_jax(q, out)
  assert_nothing_written(out)


def test_msa_config_json_without_msa_config(src, out):
  m = src("msa")
  edit_json(os.path.join(m, "config.json"), lambda c: c.pop("msa_config"))
  with pytest.raises(CheckpointError, match=mentions(os.path.join(m, "config.json"),
                                                     "model_type 'msa' needs an 'msa_config'")):
    hf_to_msa_jax(m, out)
  assert_nothing_written(out)


# --------------------------------------------------------------------------- model.safetensors


def test_missing_safetensors(src, out):
  q = src("qwen3")
  os.remove(os.path.join(q, SINGLE_FILE))
  with pytest.raises(CheckpointError, match=mentions(f"no {SINGLE_FILE} or {INDEX_FILE} in {q}")):
    hf_to_msa_jax(q, out)
  assert_nothing_written(out)


@pytest.mark.parametrize("keep", ["half", "all_but_4_bytes", "4_bytes", "empty"])
def test_truncated_safetensors(src, out, keep):
  q = src("qwen3")
  path = os.path.join(q, SINGLE_FILE)
  size = os.path.getsize(path)
  truncate(path, {"half": size // 2, "all_but_4_bytes": size - 4, "4_bytes": 4, "empty": 0}[keep])
  with pytest.raises(CheckpointError, match=mentions("corrupt or unreadable safetensors file", path)):
    hf_to_msa_jax(q, out)
  assert_nothing_written(out)


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(4096), b"not a tensor file\n" * 50],
                         ids=["random_bytes", "text"])
def test_garbage_safetensors(src, out, content):
  q = src("qwen3")
  path = os.path.join(q, SINGLE_FILE)
  write_bytes(path, content)
  with pytest.raises(CheckpointError, match=mentions("corrupt or unreadable safetensors file", path)):
    hf_to_msa_jax(q, out)
  assert_nothing_written(out)


# --------------------------------------------------------------------------- sharded checkpoints


def test_sharded_index_names_missing_shard(src, out):
  s = src("sharded")
  gone = _shards(s)[1]
  os.remove(os.path.join(s, gone))
  with pytest.raises(CheckpointError, match=mentions(os.path.join(s, INDEX_FILE),
                                                     "names shard files that are missing", gone)):
    hf_to_msa_jax(s, out)
  assert_nothing_written(out)


@pytest.mark.parametrize("content", [
    b'{"metadata": {"total_size": 1}, "weight_map": {"model.norm.weight": ',
    b"\x00\x01\x02\xff binary",
    b'{"metadata": {}}',
    b"[]",
    b'{"weight_map": ["model-00001-of-00002.safetensors", "x"]}',
    b'{"weight_map": {"model.norm.weight": 3}}',
], ids=["truncated_json", "binary", "no_weight_map", "json_list", "weight_map_list",
        "weight_map_not_names"])
def test_corrupt_shard_index(src, out, content):
  s = src("sharded")
  index = os.path.join(s, INDEX_FILE)
  write_bytes(index, content)
  with pytest.raises(CheckpointError, match=mentions("corrupt shard index", index)):
    hf_to_msa_jax(s, out)
  assert_nothing_written(out)


def test_shard_lacking_a_tensor_its_index_lists(src, out):
  s = src("sharded")
  index = os.path.join(s, INDEX_FILE)
  with open(index) as f:
    weight_map = json.load(f)["weight_map"]
  first = _shards(s)[0]
  name = next(n for n, f in weight_map.items() if f != first)
  edit_json(index, lambda i: i["weight_map"].update({name: first}))
  with pytest.raises(CheckpointError, match=mentions(f"shard {first} lacks tensors its index lists",
                                                     name)):
    hf_to_msa_jax(s, out)
  assert_nothing_written(out)


def test_truncated_shard(src, out):
  s = src("sharded")
  shard = os.path.join(s, _shards(s)[2])
  truncate(shard, os.path.getsize(shard) // 2)
  with pytest.raises(CheckpointError, match=mentions("corrupt or unreadable safetensors file", shard)):
    hf_to_msa_jax(s, out)
  assert_nothing_written(out)


# --------------------------------------------------------------------------- tokenizer, input dir


def test_missing_tokenizer(src, out):
  q = src("qwen3")
  os.remove(os.path.join(q, "tokenizer.json"))
  with pytest.raises(CheckpointError, match=mentions(q, "has no tokenizer.json",
                                                     "require_tokenizer=False")):
    hf_to_msa_jax(q, out)
  assert_nothing_written(out)
  hf_to_msa_jax(q, out, require_tokenizer=False)
  assert os.path.exists(os.path.join(out, convert.CONFIG_FILE))
  assert not os.path.exists(os.path.join(out, "tokenizer.json"))
  assert os.listdir(os.path.dirname(out)) == ["converted"]


def test_input_directory_does_not_exist(tmp_path, out):
  missing = str(tmp_path / "no_such_model")
  with pytest.raises(CheckpointError, match=mentions("input directory does not exist", missing)):
    hf_to_msa_jax(missing, out)
  assert_nothing_written(out)


# --------------------------------------------------------------------------- existing output


def _make_existing_output(out: str) -> None:
  os.makedirs(out)
  with open(os.path.join(out, "keep.txt"), "w") as f:
    f.write("precious")


def _assert_existing_output_untouched(out: str) -> None:
  assert os.listdir(out) == ["keep.txt"]
  with open(os.path.join(out, "keep.txt")) as f:
    assert f.read() == "precious"
  assert os.listdir(os.path.dirname(out)) == ["converted"]


def _convert(direction, pristine, out, **kw):
  if direction == "hf_to_msa_jax":
    return hf_to_msa_jax(pristine["msa"], out, **kw)
  return msa_jax_to_hf(pristine["ckpt"], out, **kw)


@pytest.mark.parametrize("direction", ["hf_to_msa_jax", "msa_jax_to_hf"])
def test_output_exists(pristine, out, direction):
  _make_existing_output(out)
  with pytest.raises(CheckpointError, match=mentions(f"output {out} already exists", "overwrite")):
    _convert(direction, pristine, out)
  _assert_existing_output_untouched(out)

  _convert(direction, pristine, out, overwrite=True)
  marker = convert.CONFIG_FILE if direction == "hf_to_msa_jax" else "config.json"
  assert "keep.txt" not in os.listdir(out)
  assert os.path.exists(os.path.join(out, marker))
  assert os.listdir(os.path.dirname(out)) == ["converted"]


@pytest.mark.parametrize("direction", ["hf_to_msa_jax", "msa_jax_to_hf"])
def test_output_is_an_existing_file(pristine, out, direction):
  write_bytes(out, b"a file, not a directory")
  with pytest.raises(CheckpointError, match=mentions(f"output {out} already exists")):
    _convert(direction, pristine, out)
  with open(out, "rb") as f:
    assert f.read() == b"a file, not a directory"

  _convert(direction, pristine, out, overwrite=True)
  assert os.path.isdir(out)
  assert os.listdir(os.path.dirname(out)) == ["converted"]


def test_failed_overwrite_keeps_existing_output(src, out):
  q = src("qwen3")
  edit_tensors(q, lambda t: t.pop(UP_PROJ_1))
  _make_existing_output(out)
  with pytest.raises(CheckpointError, match=mentions("missing tensors (1)", UP_PROJ_1)):
    hf_to_msa_jax(q, out, overwrite=True)
  _assert_existing_output_untouched(out)


# --------------------------------------------------------------------------- msa_jax -> HF


@pytest.mark.parametrize("kind", ["qwen3", "sharded"])
def test_to_hf_on_a_hf_directory(src, out, kind):
  d = src(kind)
  with pytest.raises(CheckpointError, match=mentions(f"{d} is not an msa_jax checkpoint",
                                                     os.path.join(d, convert.CONFIG_FILE))):
    msa_jax_to_hf(d, out)
  assert_nothing_written(out)


def test_to_hf_on_a_missing_directory(tmp_path, out):
  missing = str(tmp_path / "no_such_ckpt")
  with pytest.raises(CheckpointError,
                     match=mentions("msa_jax checkpoint directory does not exist", missing)):
    msa_jax_to_hf(missing, out)
  assert_nothing_written(out)


@pytest.mark.parametrize("damage,problem", [
    (lambda p: write_bytes(p, b'{"format_version": 1, "model": '), "corrupt JSON"),
    (lambda p: write_bytes(p, b'"a string"'), "must hold a JSON object, got str"),
    (lambda p: edit_json(p, lambda m: m.update(format_version=99)), "unsupported format_version 99"),
    (lambda p: edit_json(p, lambda m: m.pop("model")), "malformed msa_jax config"),
    (lambda p: edit_json(p, lambda m: m["model"].update(num_heads=3)),
     "num_heads (3) must be a multiple of num_kv_heads (2)"),
    (lambda p: edit_json(p, lambda m: m.update(hf_model_type="llama")),
     "unknown hf_model_type 'llama'"),
], ids=["truncated_json", "json_string", "format_version", "no_model", "bad_model", "model_type"])
def test_to_hf_damaged_config(src, out, damage, problem):
  ck = src("ckpt")
  path = os.path.join(ck, convert.CONFIG_FILE)
  damage(path)
  with pytest.raises(CheckpointError, match=mentions(problem, path)):
    msa_jax_to_hf(ck, out)
  assert_nothing_written(out)


def _remove(pattern):
  def damage(params):
    paths = glob.glob(os.path.join(params, pattern))
    assert paths, pattern
    for p in paths:
      shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
  return damage


def _truncate_largest_data_file(params):
  data = max(glob.glob(os.path.join(params, "ocdbt.process_0", "d", "*")), key=os.path.getsize)
  truncate(data, 1000)


@pytest.mark.parametrize("damage", [
    _remove("ocdbt.process_0/d/*"), _remove("_METADATA"), _remove("manifest.ocdbt"),
    _remove("*"), _truncate_largest_data_file,
], ids=["data_files", "metadata", "manifest", "everything", "truncated_data"])
def test_to_hf_damaged_params(src, out, damage):
  ck = src("ckpt")
  params = os.path.join(ck, convert.PARAMS_DIR)
  damage(params)
  with pytest.raises(CheckpointError, match=mentions(f"cannot restore {params}")):
    msa_jax_to_hf(ck, out)
  assert_nothing_written(out)


def test_to_hf_without_params_directory(src, out):
  ck = src("ckpt")
  shutil.rmtree(os.path.join(ck, convert.PARAMS_DIR))
  with pytest.raises(CheckpointError, match=mentions(f"{ck} has no params/ directory")):
    msa_jax_to_hf(ck, out)
  assert_nothing_written(out)


def test_to_hf_params_missing_what_the_config_implies(src, out):
  ck = src("ckpt")
  edit_json(os.path.join(ck, convert.CONFIG_FILE), lambda m: m["model"].update(num_layers=5))
  with pytest.raises(CheckpointError, match=mentions(
      os.path.join(ck, convert.PARAMS_DIR), "does not match msa_jax_config.json",
      "missing parameters (11)", "layers_4/mlp/up_proj/kernel")):
    msa_jax_to_hf(ck, out)
  assert_nothing_written(out)


def test_to_hf_params_of_other_shapes_than_the_config(src, out):
  ck = src("ckpt")
  edit_json(os.path.join(ck, convert.CONFIG_FILE), lambda m: m["model"].update(intermediate_size=96))
  with pytest.raises(CheckpointError, match=mentions(
      "does not match msa_jax_config.json",
      "layers_0/mlp/gate_proj/kernel has shape [64, 128], expected [64, 96]",
      "layers_3/mlp/down_proj/kernel has shape [128, 64], expected [96, 64]")):
    msa_jax_to_hf(ck, out)
  assert_nothing_written(out)


def test_to_hf_bad_format_argument(pristine, out):
  with pytest.raises(CheckpointError, match=mentions("hf_format must be auto, qwen3 or msa",
                                                     "'llama'")):
    msa_jax_to_hf(pristine["ckpt"], out, hf_format="llama")
  assert_nothing_written(out)


# --------------------------------------------------------------------------- command line


def test_cli_reports_a_bad_checkpoint(src, out):
  q = src("qwen3")
  edit_tensors(q, lambda t: t.pop(UP_PROJ_1))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO,
                                                                  os.environ.get("PYTHONPATH")])))
  result = run_python(
      [os.path.join(REPO, "tools", "convert_checkpoint.py"),
       "--direction=hf_to_msa_jax", f"--input={q}", f"--output={out}"],
      cwd=REPO, env=env, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith(f"convert_checkpoint: {q}: missing "
                                                            f"tensors (1): ['{UP_PROJ_1}']")
  assert "wrote" not in result.stdout
  assert_nothing_written(out)

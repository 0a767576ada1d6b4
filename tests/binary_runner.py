"""Runs the repository's binaries for the tests without paying a fresh interpreter's start-up (python,
jax, orbax, msa_jax: several seconds on a 2-core CI machine) for every run.

A server process imports those libraries once, never touching a JAX backend, and forks one child
per run; the child takes the run's argv, working directory, environment, stdout and stderr, and
executes the script as `__main__` with the script's directory first on sys.path, as
`python <script> <args>` does. Its exit status is what that interpreter's would be (SystemExit's
code, 1 and the traceback on stderr for an uncaught exception), so a test still sees exactly what
the binary prints and returns. `BinaryRunner.run` mirrors `subprocess.run(..., capture_output=True,
text=True)`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Heavy imports every binary shares; a child finds them in sys.modules.
PRELOAD = ("jax", "jax.numpy", "flax.linen", "orbax.checkpoint", "numpy", "absl.app", "absl.flags",
           "msa_jax", "msa_jax.cli")


def _child(request: dict) -> None:
  """In the forked child: become `python <script> <args>` and never return."""
  out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(out, 1)
  os.dup2(err, 2)
  devnull = os.open(os.devnull, os.O_RDONLY)
  os.dup2(devnull, 0)
  sys.stdout = sys.__stdout__  # the server pointed it at stderr; fd 1 is now the run's stdout
  code = 1
  try:
    import runpy  # pylint: disable=import-outside-toplevel
    import traceback  # pylint: disable=import-outside-toplevel
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
      runpy.run_path(script, run_name="__main__")
      code = 0
    except SystemExit as e:
      if e.code is None:
        code = 0
      elif isinstance(e.code, int):
        code = e.code
      else:
        print(e.code, file=sys.stderr)
        code = 1
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      code = 1
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code & 0xFF)


def serve() -> None:
  """Read one JSON request a line on stdin, answer one JSON line on stdout per finished run."""
  import importlib  # pylint: disable=import-outside-toplevel
  for name in PRELOAD:
    importlib.import_module(name)
  answers = sys.stdout
  sys.stdout = sys.stderr  # nothing else may write on the answer channel
  answers.write("ready\n")
  answers.flush()
  for line in sys.stdin:
    request = json.loads(line)
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      _child(request)
    deadline = time.monotonic() + request["timeout"]
    timed_out = False
    while True:
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        break
      if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        timed_out = True
        status = None
        break
      time.sleep(0.02)
    code = None if status is None else (os.WEXITSTATUS(status) if os.WIFEXITED(status)
                                        else -os.WTERMSIG(status))
    answers.write(json.dumps({"returncode": code, "timed_out": timed_out}) + "\n")
    answers.flush()


def _compilation_cache_env() -> dict[str, str]:
  """The persistent compilation cache of the test process (tests/conftest.py), if it has one, as
  the server's environment: its runs are sequential, so they share it, and a binary run again with
  the same model and shapes loads its executables instead of compiling them again."""
  jax = sys.modules.get("jax")
  cache_dir = jax.config.jax_compilation_cache_dir if jax is not None else None
  if not cache_dir:
    return {}
  return {"JAX_COMPILATION_CACHE_DIR": cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS":
              str(jax.config.jax_persistent_cache_min_compile_time_secs)}


class BinaryRunner:
  """One server for a test session; `run(argv, ...)` runs `python argv[0] argv[1:]`."""

  def __init__(self):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.update(_compilation_cache_env())
    self._dir = tempfile.mkdtemp(prefix="binary_runner_")
    self._proc = subprocess.Popen([sys.executable, "-m", "tests.binary_runner"], cwd=ROOT, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert self._proc.stdout.readline() == "ready\n", "the binary runner did not start"
    self._count = 0

  def run(self, argv, *, cwd=ROOT, env=None, timeout=300) -> subprocess.CompletedProcess:
    self._count += 1
    out = os.path.join(self._dir, f"{self._count}.out")
    err = os.path.join(self._dir, f"{self._count}.err")
    request = {"argv": [str(a) for a in argv], "cwd": str(cwd),
               "env": dict(os.environ if env is None else env), "stdout": out, "stderr": err,
               "timeout": timeout}
    self._proc.stdin.write(json.dumps(request) + "\n")
    self._proc.stdin.flush()
    answer = json.loads(self._proc.stdout.readline())
    with open(out) as f:
      stdout = f.read()
    with open(err) as f:
      stderr = f.read()
    os.remove(out)
    os.remove(err)
    if answer["timed_out"]:
      raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
    return subprocess.CompletedProcess(argv, answer["returncode"], stdout, stderr)

  def close(self):
    self._proc.stdin.close()
    self._proc.wait(timeout=60)
    os.rmdir(self._dir) if not os.listdir(self._dir) else None


_SHARED = None


def run_python(argv, **kwargs) -> subprocess.CompletedProcess:
  """`subprocess.run([sys.executable, *argv], capture_output=True, text=True, ...)`, through one
  BinaryRunner shared by the whole test session (started on first use, closed at exit)."""
  global _SHARED  # pylint: disable=global-statement
  if _SHARED is None:
    import atexit  # pylint: disable=import-outside-toplevel
    _SHARED = BinaryRunner()
    atexit.register(_SHARED.close)
  return _SHARED.run(argv, **kwargs)


if __name__ == "__main__":
  serve()

"""Many devices: G-SGD under ``jax.sharding`` on 8 simulated CPU devices (GitHub issue 5).

The device count is fixed when JAX starts, so ``tests/_sharded_check.py`` (the checks: same update
as on one device, shardings kept by updates, params and optimizer state) and
``examples/multi_device.py`` (the documented example, tiny sizes) run in subprocesses with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Both run concurrently (~45 s on 2 cores).
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600

CASES = [
    *(f"mlp/{opt}/mesh(4,2)" for opt in ("gsgd", "gsgd_momentum", "gsgd_adam")),
    "mlp/gsgd_momentum/mesh(8,)",
    "cnn1d/gsgd_momentum/mesh(4,2)",
    "mlp/gsgd_momentum/explicit-mesh(8,)",
    "update/gsgd_adam/explicit-mesh(4,2)",
]


def _env():
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=8"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return env


def _start(*args):
  return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc):
  try:
    out, err = proc.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"timed out after {TIMEOUT}s:\n{out}\n{err[-3000:]}")
  return proc.returncode, out, err


@pytest.fixture(scope="module")
def runs():
  """Starts both subprocesses at once (they overlap on 2 cores) and waits for them."""
  check = _start("tests/_sharded_check.py")
  example = _start("examples/multi_device.py", "--steps", "4", "--width", "16", "--depth", "2",
                   "--batch", "32")
  return {"check": _finish(check), "example": _finish(example)}


@pytest.fixture(scope="module")
def results(runs):
  rc, out, err = runs["check"]
  rows = {}
  for line in out.splitlines():
    if line.startswith("{"):
      r = json.loads(line)
      rows[r["case"]] = r
  assert rows, f"no results (rc={rc}):\n{out}\n{err[-3000:]}"
  return rc, rows, err


def test_all_cases_ran(results):
  rc, rows, err = results
  assert sorted(rows) == sorted(CASES), err[-3000:]
  assert rc == 0, "\n".join(json.dumps(r) for r in rows.values() if not r["ok"])


@pytest.mark.parametrize("case", CASES)
def test_same_update_as_one_device(results, case):
  r = results[1][case]
  assert r["update_norm_err"] <= 1e-6, r
  assert r["update_err"] <= 1e-5, r
  assert r["step_err"] <= 1e-5 and r["step_norm_err"] <= 1e-5, r
  assert r["loss_err"] <= 1e-5, r


@pytest.mark.parametrize("case", CASES)
def test_shardings_kept(results, case):
  r = results[1][case]
  assert r["update_specs_bad"] == [], r
  assert r["param_specs_bad"] == [], r
  assert r["state_specs_bad"] == [], r
  assert not r["recompiled"], r


def test_multi_device_example(runs):
  rc, out, err = runs["example"]
  assert rc == 0, f"{out}\n{err[-3000:]}"
  assert "8 devices, mesh {'data': 4, 'model': 2}" in out, out
  losses = [float(v) for v in re.findall(r"loss (\S+)", out)]
  assert len(losses) >= 4 and all(math.isfinite(v) for v in losses), out
  assert "Dense_0/kernel (64, 16): P(None, 'model'), per-device shard (64, 8)" in out, out

"""Many devices: G-SGD under ``jax.sharding`` on 8 simulated CPU devices (GitHub issue 5).

The device count is fixed when JAX starts, so ``tests/_sharded_check.py`` (the checks: same update
as on one device, shardings kept by updates, params and optimizer state) and
``examples/multi_device.py`` (the documented example, tiny sizes) run in subprocesses with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Both run concurrently (~45 s on 2 cores).

The ``shard_alike`` lowering workaround (``gsgd_jax._sharding._shard_alike_workaround``; without it
``mlp/gsgd/mesh(4,2)`` gives a replicated bias its split neighbour's sharding): importing
``gsgd_jax`` leaves JAX's lowering registry alone, a jitted update on one device too; the first
G-space update traced with several devices applies it, on verified JAX versions only.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from gsgd_jax import _sharding

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600

CASES = [
    *(f"mlp/{opt}/mesh(4,2)" for opt in ("gsgd", "gsgd_momentum", "gsgd_adam")),
    "mlp/gsgd_momentum/mesh(8,)",
    "cnn1d/gsgd_momentum/mesh(4,2)",
    "mlp/gsgd_momentum/explicit-mesh(8,)",
    "update/gsgd_adam/explicit-mesh(4,2)",
]


def _env(devices=8):
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return env


def _start(*args, devices=8):
  return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(devices), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc):
  try:
    out, err = proc.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"timed out after {TIMEOUT}s:\n{out}\n{err[-3000:]}")
  return proc.returncode, out, err


# Records every lowering registered for shard_alike, imports gsgd_jax, then traces a jitted
# G-space update on params split over all devices (replicated on one device).
REGISTRY_CHECK = """
import json
import jax
from jax._src import shard_alike as sa
from jax._src.interpreters import mlir as _mlir
from jax.interpreters import mlir
calls = []
real = _mlir.register_lowering
def record(prim, *args, **kwargs):  # JAX registers its own lazily: keep shard_alike's
  if prim is sa.shard_alike_p:
    calls.append(dict(cacheable=kwargs.get("cacheable", True)))
  return real(prim, *args, **kwargs)
mlir.register_lowering = _mlir.register_lowering = record
import jax.numpy as jnp
import gsgd_jax
import gsgd_jax.path_sgd
after_import = dict(calls=list(calls), uncached=sa.shard_alike_p in _mlir._uncacheable_primitives)
n = jax.device_count()
mesh = jax.make_mesh((n,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
params = {"Dense_0": {"kernel": jnp.full((4, 2 * n), 0.5)}, "Dense_1": {"kernel": jnp.full((2 * n, 2), 0.5)}}
params = jax.device_put(params, {"Dense_0": {"kernel": spec}, "Dense_1": {"kernel": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}})
tx = gsgd_jax.gsgd(0.1, structure=gsgd_jax.infer_structure(params))
state = tx.init(params)
jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
print(json.dumps(dict(devices=n, after_import=after_import, after_update=dict(
    calls=list(calls), uncached=sa.shard_alike_p in _mlir._uncacheable_primitives))))
"""


@pytest.fixture(scope="module")
def runs():
  """Starts both subprocesses at once (they overlap on 2 cores) and waits for them."""
  check = _start("tests/_sharded_check.py")
  example = _start("examples/multi_device.py", "--steps", "4", "--width", "16", "--depth", "2",
                   "--batch", "32")
  registry = {n: _start("-c", REGISTRY_CHECK, devices=n) for n in (1, 2)}
  return {"check": _finish(check), "example": _finish(example),
          **{f"registry{n}": _finish(p) for n, p in registry.items()}}


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


def _registry(runs, devices):
  rc, out, err = runs[f"registry{devices}"]
  assert rc == 0, f"{out}\n{err[-3000:]}"
  return json.loads(out.strip().splitlines()[-1])


def test_import_leaves_the_lowering_registry_alone(runs):
  """Importing gsgd_jax registers no lowering; with one device a jitted update does not either."""
  for devices in (1, 2):
    r = _registry(runs, devices)
    assert r["devices"] == devices, r
    assert r["after_import"] == {"calls": [], "uncached": False}, r
  r = _registry(runs, 1)
  assert r["after_update"] == {"calls": [], "uncached": False}, r


def test_workaround_applied_when_tracing_with_several_devices(runs):
  r = _registry(runs, 2)
  verified = _sharding._jax_version(jax.__version__) in _sharding.SHARD_ALIKE_VERIFIED
  assert verified, f"JAX {jax.__version__}: re-verify the shard_alike workaround (see above)"
  assert r["after_update"] == {"calls": [{"cacheable": False}], "uncached": True}, r


def test_workaround_version_guard(monkeypatch):
  applied = []
  monkeypatch.setattr(_sharding, "_uncached_shard_alike_lowering", lambda: applied.append(1))
  assert _sharding._jax_version("0.10.2") == (0, 10)
  assert _sharding._jax_version("0.10.2.dev20260101+abc") == (0, 10)
  assert _sharding._jax_version("1.0rc1") == (1, 0)
  monkeypatch.setattr(_sharding, "_shard_alike_checked", False)
  monkeypatch.setattr(jax, "__version__", "0.11.0")
  with pytest.warns(UserWarning, match=r"verified on JAX 0\.10 only and is not applied on JAX "
                                       r"0\.11\.0.*may be forced to one sharding"):
    _sharding._shard_alike_workaround()
  _sharding._shard_alike_workaround()  # once per process: no second warning, nothing applied
  assert applied == []
  monkeypatch.setattr(_sharding, "_shard_alike_checked", False)
  monkeypatch.setattr(jax, "__version__", "0.10.9")
  _sharding._shard_alike_workaround()
  _sharding._shard_alike_workaround()
  assert applied == [1]

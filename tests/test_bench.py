"""Smoke tests of the benchmark scripts (no timings are asserted: speed lives in bench/)."""

import importlib.util
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _load(name):
  sys.path.insert(0, BENCH)
  try:
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  finally:
    sys.path.remove(BENCH)


def test_bench_quick_table(tmp_path, capsys):
  bench = _load("bench")
  out = tmp_path / "table.md"
  bench.main(["--quick", "--models", "mlp1024", "--rounds", "1", "--iters", "1",
              "--compare-modulo", "--out", str(out)])
  table = out.read_text()
  assert "aligned / modulo" in table
  rows = [l for l in table.splitlines() if l.startswith("| mlp1024")]
  assert [r.split("|")[2].strip() for r in rows] == ["sgd", "momentum", "adam"]
  for r in rows:
    ratio = float(r.split("|")[5].strip().strip("*x"))
    assert ratio > 0 and float(r.split("|")[10].strip().strip("x")) > 0


def test_bench_params_use_reference_init():
  bench = _load("bench")
  import numpy as np
  import gsgd_jax
  _, variables, _, _, structure = bench.build("mlp1024", True)
  mask = gsgd_jax.skeleton_mask(structure, variables["params"])
  kernel = np.asarray(variables["params"]["Dense_1"]["kernel"])
  np.testing.assert_array_equal(kernel[np.asarray(mask["Dense_1"]["kernel"])], 1.0)


@pytest.mark.parametrize("model", ["mlp1024"])
def test_hlo_report(model, capsys):
  report = _load("hlo_report")
  report.main(["--model", model, "--quick"])
  text = capsys.readouterr().out
  assert "| dots |" in text
  host = [l for l in text.splitlines() if l.startswith("| host round trips")][0]
  assert host.split("|")[2:5] == [" 0 ", " 0 ", " 0 "]  # tx.update never leaves the device

"""The investigation script behind docs/results.md's convnet section runs, and its prototype
(the tap-RMS gauge, monkeypatched into the library at run time) is still exact and invariant."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_conv_tap_scales_prototype_is_invariant():
  out = subprocess.run([sys.executable, "examples/conv_tap_scales.py", "invariance", "taprms"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  diff = float(re.search(r"max \|f\(step\(w\)\) - f\(step\(rescaled w\)\)\|: (\S+)",
                         out.stdout).group(1))
  assert diff < 1e-10

"""A checkpointed run resumes bit for bit in a new process (the README's recipe), with flax
serialization and with Orbax, for gsgd with momentum and gsgd_adam, Dense and conv nets."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _resume_check  # noqa: E402

# Both processes compile with XLA's optimizations off (this module's fixture, the child's
# environment): bit for bit needs the same programs on both sides, not optimized ones.
pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_resume_in_a_new_process_is_bit_for_bit(tmp_path):
  finals = _resume_check.save(tmp_path)
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  out = subprocess.run([sys.executable, str(pathlib.Path(__file__).parent / "_resume_check.py"),
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  for case in _resume_check.CASES:
    resumed = np.load(tmp_path / case / "resumed.npz")
    assert set(resumed.files) == set(finals[case])
    for name, want in finals[case].items():
      np.testing.assert_array_equal(resumed[name], want, err_msg=f"{case}: {name}")

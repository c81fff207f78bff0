"""The README's code blocks run as written (the "Use" and "Checkpoints" sections, in order, in
one namespace): the first thing a user copies always works."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = ("## Use", "## Checkpoints")


def _blocks() -> list[str]:
  text = README.read_text()
  blocks = []
  for heading in SECTIONS:
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    section = text[start:end if end != -1 else len(text)]
    blocks += re.findall(r"```python\n(.*?)```", section, flags=re.S)
  return blocks


def test_readme_sections_have_code():
  assert len(_blocks()) >= 5


@pytest.mark.filterwarnings("ignore:gsgd_jax. no structure given:UserWarning")
def test_readme_code_runs_as_written(capsys):
  namespace: dict = {}
  for i, block in enumerate(_blocks()):
    exec(compile(block, f"README.md block {i}", "exec"), namespace)  # noqa: S102
  out = capsys.readouterr().out
  assert "BasisPathStructure: 1 chain(s) in G-space" in out
  loss = float(re.search(r"loss after 50 steps: (\S+)", out).group(1))
  assert loss < 2.0  # log(10) = 2.30 at the start
  assert float(namespace["loss"]) < 2.3

"""README.md stays true: its Python blocks run as pasted, in order, in one fresh interpreter outside the repository
(only the packages importable, as after `pip install`; a later block may use what an earlier one defined, as in a
notebook), and its memory table is what `python -m ring_jax.memory` prints.

A block that cannot run here (it needs released weights, or shows shapes only) is preceded by the line
`<!-- readme-test: not run (REASON) -->`.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
from support import REPO, ChildProcess

README = (REPO / "README.md").read_text()
NOT_RUN = re.compile(r"<!-- readme-test: not run \((.+)\) -->")
# Runs the blocks (a JSON list of [line, code]) in one namespace; a failure's traceback names "README.md:<line>". It
# first checks that it sees the packages only, not the repository's top-level folders (configs/, tests/).
RUNNER = """
import importlib.util, json, sys
assert importlib.util.find_spec("configs") is None, "the repository is on sys.path"
namespace = {"__name__": "__main__"}
for line, code in json.loads(sys.argv[1]):
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
"""


def python_blocks() -> list[tuple[int, str, str | None]]:
    """(line number, code, why it is not run or None) of every ```python block of the README."""
    blocks = []
    lines = README.splitlines()
    for number, line in enumerate(lines):
        if line.strip() != "```python":
            continue
        end = next(i for i in range(number + 1, len(lines)) if lines[i].strip() == "```")
        marker = NOT_RUN.fullmatch(lines[number - 1].strip()) if number else None
        blocks.append((number + 1, "\n".join(lines[number + 1 : end]) + "\n", marker.group(1) if marker else None))
    return blocks


def test_every_block_is_run_or_says_why_not():
    blocks = python_blocks()
    assert [reason for _, _, reason in blocks if reason is None], "no README block runs"
    assert len(NOT_RUN.findall(README)) == sum(reason is not None for _, _, reason in blocks), "a marker is astray"


@pytest.mark.slow
def test_readme_python_blocks_run_as_pasted(tmp_path):
    installed = tmp_path / "site"
    installed.mkdir()
    for package in ("ring_jax", "pallas_kernels"):
        (installed / package).symlink_to(REPO / package)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(installed), "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path)}
    runnable = [(line, code) for line, code, reason in python_blocks() if reason is None]
    with ChildProcess([sys.executable, "-c", RUNNER, json.dumps(runnable)], log_file=tmp_path / "readme.log",
                      timeout_s=900, env=env, cwd=tmp_path) as child:  # fmt: skip
        output = child.finish()
    assert child.returncode == 0, f"a README block fails:\n{output[-3000:]}"
    assert "(1, 10, 272)" in output, "the model block prints its logits' shape"


def test_memory_table_is_what_the_script_prints():
    from ring_jax.memory import RELEASED, format_table, table

    shown = README.split("<!-- memory-table:begin -->\n")[1].split("\n<!-- memory-table:end -->")[0]
    assert shown == format_table(table({name: get() for name, get in RELEASED.items()}, [8, 16, 32, 64]))

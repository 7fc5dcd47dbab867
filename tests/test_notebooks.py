"""The notebooks run top to bottom (code cells executed in one namespace, as a kernel would)."""

from __future__ import annotations

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, capsys):
    namespace: dict = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}:{cell['id']}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.count("generated ids:") == 2 and printed.count("finish: length") == 2  # 8 tokens per row


def test_there_is_a_notebook():
    assert NOTEBOOKS

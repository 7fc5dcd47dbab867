"""The notebooks run top to bottom (code cells executed in one namespace, as a kernel would)."""

from __future__ import annotations

import json
import re

import pytest
from support import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, capsys):
    namespace: dict = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}:{cell['id']}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.count("generated ids:") == 2 and printed.count("finish: length") == 2  # 8 tokens per row


def test_readme_notebooks_exist_and_are_stored_clean():
    """Each notebook the README names exists, so the test above runs it (an empty notebooks/ would run nothing);
    notebooks are stored as nbformat 4 with unique cell ids and no outputs, so what a reader sees is never stale."""
    named = set(re.findall(r"notebooks/[\w.-]+\.ipynb", (REPO / "README.md").read_text()))
    assert named, "README.md names no notebook"
    assert named <= {f"notebooks/{path.name}" for path in NOTEBOOKS}, named
    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text())
        assert notebook["nbformat"] == 4, path.name
        ids = [cell["id"] for cell in notebook["cells"]]
        assert len(set(ids)) == len(ids), f"{path.name}: duplicate cell ids"
        code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
        assert code, f"{path.name}: no code cells"
        for cell in code:
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}:{cell['id']} has outputs"

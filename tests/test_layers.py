"""The layering is a checked fact: import-linter's contracts (pyproject.toml) hold, and they
would catch an upward import; the runtime opens builds without torch or the adapters."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import vlm_export

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}  # this copy of vlm_export, not the installed one
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=package_parent, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    result = _lint(Path(vlm_export.__file__).parents[1])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout


def test_import_contracts_catch_an_upward_import(tmp_path):
    shutil.copytree(Path(vlm_export.__file__).parent, tmp_path / "vlm_export",
                    ignore=shutil.ignore_patterns("__pycache__", "weights"))
    limits = tmp_path / "vlm_export" / "contract" / "limits.py"
    limits.write_text(limits.read_text() + "\nfrom ..runtime.pipeline import VLMPipeline  # noqa: E402,F401\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "Layers: the contract at the bottom" in result.stdout and "BROKEN" in result.stdout
    assert "vlm_export.contract.limits -> vlm_export.runtime.pipeline" in result.stdout


def test_runtime_imports_neither_torch_nor_the_adapters():
    code = ("import sys, vlm_export.runtime.load, vlm_export.runtime.generate, vlm_export.model_repository.render; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('vlm_export.adapters')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"

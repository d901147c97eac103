"""The architecture holds: layers enforced by import-linter, small modules, torch-free serving,
and one cache policy that `FORGETPACK_CACHE=off` really turns off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from patch_factory import make_patch, write_base

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)


def test_no_module_is_over_400_lines() -> None:
    too_long = {}
    for package in ("forgetpack", "runtime"):
        for path in (ROOT / package).rglob("*.py"):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_MODULE_LINES:
                too_long[str(path.relative_to(ROOT))] = lines
    assert not too_long, too_long


def test_import_contracts_hold() -> None:
    result = subprocess.run(["lint-imports"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]


def test_an_upward_import_breaks_the_contracts(tmp_path: Path) -> None:
    """The contracts can fail: the same tree with the format layer importing the CLI is refused."""
    for name in ("forgetpack", "runtime"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("*.safetensors", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    patch_module = tmp_path / "forgetpack" / "format" / "patch.py"
    patch_module.write_text(patch_module.read_text() + "\nimport forgetpack.cli.render  # noqa: E402,F401\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(["lint-imports"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode != 0
    assert "forgetpack.format is not allowed to import forgetpack.cli" in result.stdout


def test_serving_and_patch_commands_never_import_torch(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base.safetensors")
    make_patch(base, 1).save(tmp_path / "p.fpatch")
    code = f"""
import sys
import forgetpack, runtime, runtime.backends.onnx, forgetpack.format.patch, forgetpack.format.checkpoint
from forgetpack.cli import main
assert forgetpack.read_patch({str(tmp_path / 'p.fpatch')!r}).model == "test-model"
for args in (["--help"], ["inspect", {str(tmp_path / 'p.fpatch')!r}], ["verify", {str(tmp_path / 'p.fpatch')!r}],
             ["backends", "--json"]):
    assert main(args) == 0, args
heavy = sorted(m for m in ("torch", "open_clip", "torchvision", "onnx") if m in sys.modules)
print("heavy:", heavy)
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "heavy: []" in result.stdout


@pytest.mark.slow
def test_cache_off_writes_nothing_anywhere(tmp_path: Path) -> None:
    """With FORGETPACK_CACHE=off a forget run and an eval run leave only their own outputs:
    no feature cache, no image-embedding cache, in the home folder, the working folder or a
    folder named 'off'."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {**os.environ, "FORGETPACK_CACHE": "off", "HOME": str(home), "MPLCONFIGDIR": str(tmp_path / "mpl")}
    for args in (["forget", "mini", "--forget", "seven", "-o", "seven.fpatch", "--json"],
                 ["eval", "mini", "--patch", "seven.fpatch", "--forget", "seven", "--dataset", "digits", "--json"]):
        result = subprocess.run([sys.executable, "-m", "forgetpack.cli", *args], capture_output=True, text=True,
                                cwd=work, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in work.iterdir()) == ["seven.fpatch"]
    written = [str(p.relative_to(home)) for p in home.rglob("*")]
    assert not [p for p in written if "forgetpack" in p], written


def test_docs_name_only_files_that_exist() -> None:
    """Every source file the docs name in backticks exists (issue 23, item 11: two named files that had
    moved). A path is read from the repository root, or from the package (`cli/commands/forget.py`)."""
    import re

    root = ROOT
    missing = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for path in re.findall(r"`([A-Za-z0-9_./-]+/[A-Za-z0-9_.-]+\.py)`", doc.read_text(encoding="utf-8")):
            if not any((base / path).exists() for base in (root, root / "forgetpack")):
                missing.append(f"{doc.name}: {path}")
    assert not missing

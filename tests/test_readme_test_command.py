"""The README's test command passes on a fresh machine by itself (issue 23, item 0).

It is ``bash tools/run_tests.sh``, which installs the one system package the tests need (Debian's
chromium, for the page test) before pip, ruff, lint-imports and pytest; CI runs the same line.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "run_tests.sh"


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("run the whole test suite") :]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_readme_test_command_is_the_script_ci_runs() -> None:
    command = readme_test_command()
    assert command == "bash tools/run_tests.sh"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, "CI must run the README's test command verbatim"
    # The README quotes the script's pytest line: in parallel (pytest-xdist, in the test extra), the ten slowest listed.
    (line,) = [line for line in SCRIPT.read_text().splitlines() if line.startswith("python -m pytest")]
    assert line.endswith(' "$@"')
    pytest_line = line.removesuffix(' "$@"')
    assert f"`{pytest_line}`" in " ".join((ROOT / "README.md").read_text().split())
    assert {"--durations=10", "-n", "--dist"} <= set(pytest_line.split())
    assert re.search(r'^\s*"pytest-xdist[><=]', (ROOT / "pyproject.toml").read_text(), re.M)


def fake_apt(tmp_path: Path) -> tuple[Path, Path]:
    """A bin folder whose apt-get records its arguments and 'installs' chromium at a private path."""
    bin_dir, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    chromium = tmp_path / "usr-bin" / "chromium"
    apt = bin_dir / "apt-get"
    apt.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f'case "$*" in *install*) mkdir -p {chromium.parent}; printf "#!/bin/sh\\n" > {chromium}; chmod +x {chromium};; esac\n'
    )
    apt.chmod(0o755)
    return bin_dir, chromium


def run_system_step(tmp_path: Path, chromium: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FORGETPACK_CHROMIUM": str(chromium)}
    return subprocess.run(["bash", str(SCRIPT), "--system-only"], env=env, capture_output=True, text=True, timeout=60)


def test_the_script_installs_chromium_when_it_is_missing(tmp_path: Path) -> None:
    bin_dir, chromium = fake_apt(tmp_path)
    if os.geteuid() != 0:  # as a user the script goes through sudo; make it a pass-through
        sudo = bin_dir / "sudo"
        sudo.write_text('#!/bin/sh\nexec "$@"\n')
        sudo.chmod(0o755)
    result = run_system_step(tmp_path, chromium, bin_dir)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert calls[0].startswith("update")
    assert "install" in calls[1] and calls[1].split()[-1] == "chromium"
    assert os.access(chromium, os.X_OK)
    assert "system-wide" in result.stderr


def test_the_script_leaves_an_installed_chromium_alone(tmp_path: Path) -> None:
    bin_dir, chromium = fake_apt(tmp_path)
    chromium.parent.mkdir(parents=True)
    chromium.write_text("#!/bin/sh\n")
    chromium.chmod(0o755)
    result = run_system_step(tmp_path, chromium, bin_dir)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "apt.log").exists()

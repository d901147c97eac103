#!/usr/bin/env bash
# The README's test command: install what the tests need, then ruff, the import layers and pytest.
#
# System-wide it installs one thing: Debian's `chromium` package (apt-get, as root or through sudo),
# which the page test drives headless; browser builds that download themselves fail offline.
# Everything else goes into the current Python environment with pip (the `[test]` extra).
# `--system-only` stops after the system step; any other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM="${FORGETPACK_CHROMIUM:-/usr/bin/chromium}"

install_chromium() {
    if [ -x "$CHROMIUM" ]; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "error: the page test needs Debian's chromium at $CHROMIUM; as root run: apt-get install chromium" >&2
            exit 1
        fi
        sudo="sudo"
    fi
    echo "installing Debian's chromium (system-wide, for the page test)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
}

install_chromium
if [ "${1:-}" = "--system-only" ]; then
    exit 0
fi
pip install -q -c constraints.txt -e ".[test]"
ruff check .
lint-imports
# Tests run in parallel processes (pytest-xdist), one per core and at most 4 (each holds torch models); a
# worker runs each module whole, and the Ray tests one after the other (tests/conftest.py). `-n 0` runs serially.
python -m pytest -q --durations=10 -n auto --maxprocesses 4 --dist loadgroup --no-loadscope-reorder "$@"

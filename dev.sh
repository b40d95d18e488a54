#!/usr/bin/env bash
# The two set-up commands of the README:
#   ./dev.sh up [ARGS]     install into .venv if needed, then `rollproof up ARGS`
#   ./dev.sh test [ARGS]   install into .venv (with the dev and verifiers extras) if needed, then pytest ARGS
# and for contributors:
#   ./dev.sh lint          ruff (lint and format check) and mypy (strict where pyproject.toml says)
set -euo pipefail
cd "$(dirname "$0")"

VENV=${ROLLPROOF_VENV:-.venv}
PYTHON=${PYTHON:-python3}
# The CPU build. A GPU machine installs its own torch into the venv first; a torch that
# is already there is kept.
TORCH_SPEC=${ROLLPROOF_TORCH_SPEC:-torch==2.13.0}

ensure_env() {
    local extras=$1
    local stamp="$VENV/.installed-$extras-$(cat pyproject.toml | sha256sum | cut -c1-16)"
    [ -f "$stamp" ] && return 0
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || { echo "dev.sh: Python >= 3.11 is required ($PYTHON is $("$PYTHON" --version))" >&2; exit 1; }
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/python" -c 'import torch' 2>/dev/null || "$VENV/bin/pip" install -q "$TORCH_SPEC"
    "$VENV/bin/pip" install -q -e ".[$extras]"
    rm -f "$VENV"/.installed-"$extras"-*
    touch "$stamp"
}

# The dashboard's browser test drives Debian's chromium; it skips when there is none.
ensure_chromium() {
    [ -x /usr/bin/chromium ] && return 0
    command -v apt-get >/dev/null || return 0
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; } >/dev/null 2>&1 \
        || echo "dev.sh: could not install chromium; the dashboard's browser test will be skipped" >&2
}

# The code task runs programs in bubblewrap sandboxes; its tests skip when bwrap cannot run.
ensure_bubblewrap() {
    [ -x /usr/bin/bwrap ] && return 0
    command -v apt-get >/dev/null || return 0
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq bubblewrap || { apt-get update -qq && apt-get install -y -qq bubblewrap; }; } >/dev/null 2>&1 \
        || echo "dev.sh: could not install bubblewrap; the code task cannot run and its tests will be skipped" >&2
}

command=${1:-}
shift || true
case "$command" in
    up)
        ensure_env postgres
        ensure_bubblewrap
        exec "$VENV/bin/rollproof" up "$@"
        ;;
    test)
        # The verifiers extra too: the adapter's tests run against the real package, not skipped.
        ensure_env dev,verifiers
        ensure_chromium
        ensure_bubblewrap
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    lint)
        ensure_env dev
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        exec "$VENV/bin/mypy"
        ;;
    *)
        echo "usage: ./dev.sh up [ARGS] | ./dev.sh test [PYTEST ARGS] | ./dev.sh lint" >&2
        exit 2
        ;;
esac

#!/usr/bin/env bash
# One entry point for people and CI. Creates ./.venv on first use (and refreshes it when
# pyproject.toml changes), then runs a job:
#   ./dev.sh demo [vimpac demo options]   the full pipeline on a generated demo corpus
#   ./dev.sh test [pytest options]        the test suite (2 parallel workers; -n 0: serial)
#   ./dev.sh vimpac ARGS...               any vimpac command inside the environment
#   ./dev.sh setup                        only create/refresh the environment
# Environment: PYTHON (interpreter for the venv, default python3.11 or python3),
# VIMPAC_VENV (default .venv), TORCH_SPEC (default "torch==2.13.0"), TORCH_INDEX_URL
# (e.g. https://download.pytorch.org/whl/cu124 for a GPU build, .../whl/cpu for a CPU one).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=${VIMPAC_VENV:-.venv}
if [ -z "${PYTHON:-}" ]; then
  PYTHON=$(command -v python3.11 || command -v python3 || true)
fi

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    [ -n "$PYTHON" ] || { echo "dev.sh: no python3 found; set PYTHON" >&2; exit 1; }
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
      || { echo "dev.sh: vimpac needs Python >= 3.11 ($PYTHON is older); set PYTHON" >&2; exit 1; }
    echo "dev.sh: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.vimpac-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "dev.sh: installing vimpac and its dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build on
    # a CPU machine. Once a torch is installed, the project's "torch>=2.4" reuses it.
    if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
      "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    fi
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    touch "$stamp"
  fi
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/vimpac" demo "$@" ;;
  # Two pytest-xdist workers (one compute thread each, tests/conftest.py) where there are two
  # cores; `./dev.sh test -n 0` runs serially, VIMPAC_TEST_WORKERS picks another count.
  test) setup
    workers=${VIMPAC_TEST_WORKERS:-$(( $(nproc 2>/dev/null || echo 1) >= 2 ? 2 : 1 ))}
    exec "$VENV/bin/python" -m pytest -n "$workers" --dist worksteal "$@" ;;
  vimpac) setup; exec "$VENV/bin/vimpac" "$@" ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac

#!/usr/bin/env bash
# ensure_venv.sh VERSION CACHE_DIR
#
# Creates or reuses CACHE_DIR/realvllm-VERSION: a venv holding the real vLLM
# wheel (CUDA build from PyPI, ~9 GB) that tests/realvllm/check_argv.py runs in.
# Reused when `import vllm` there reports exactly VERSION; otherwise rebuilt.
# uv's wheel cache is CACHE_DIR/uv. The LAST line of stdout is the venv's
# python (progress goes to stderr), so callers can do
#   VLLM_FLEET_REAL_VLLM_PYTHON=$(tests/realvllm/ensure_venv.sh 0.25.0 /var/cache/vllm-fleet-ci | tail -1)
#
# VERSION "nightly" installs the newest pre-release from vLLM's nightly index
# (https://wheels.vllm.ai/nightly) into CACHE_DIR/realvllm-nightly, refreshing it
# on every call (uv's cache makes an unchanged nightly quick).
# uv: $UV if set, else `uv` on PATH, else CACHE_DIR/uv-venv/bin/uv (.ci/run's).
# REALVLLM_PYTHON_VERSION (default 3.11) picks the interpreter uv creates the venv with.
set -euo pipefail

if [ $# -ne 2 ] || [ -z "$1" ] || [ -z "$2" ]; then
    echo "usage: $0 VERSION CACHE_DIR" >&2
    exit 2
fi
VERSION=$1
CACHE=$2
VENV="$CACHE/realvllm-$VERSION"
PY="$VENV/bin/python"
NIGHTLY_INDEX=https://wheels.vllm.ai/nightly

log() { echo "[realvllm] $*" >&2; }

installed_version() {  # prints vllm.__version__ of the venv, or nothing
    [ -x "$PY" ] || return 0
    "$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null | tail -1 || true
}

find_uv() {
    if [ -n "${UV:-}" ]; then echo "$UV"
    elif command -v uv >/dev/null; then command -v uv
    elif [ -x "$CACHE/uv-venv/bin/uv" ]; then echo "$CACHE/uv-venv/bin/uv"
    else
        log "uv not found (set UV, put uv on PATH, or run .ci/run's install_uv first)"
        return 1
    fi
}

mkdir -p "$CACHE"
start=$(date +%s)
have=$(installed_version)
if [ "$VERSION" != nightly ] && [ "$have" = "$VERSION" ]; then
    log "reusing $VENV (vllm $have)"
else
    uv_bin=$(find_uv)
    export UV_CACHE_DIR="$CACHE/uv"
    if [ "$VERSION" = nightly ]; then
        [ -x "$PY" ] || "$uv_bin" venv -q -p "${REALVLLM_PYTHON_VERSION:-3.11}" "$VENV" >&2
        log "installing the newest vLLM nightly into $VENV (had: ${have:-none})"
        "$uv_bin" pip install -p "$PY" -U --prerelease=allow vllm --extra-index-url "$NIGHTLY_INDEX" \
            --index-strategy unsafe-best-match >&2
    else
        log "creating $VENV with vllm==$VERSION (had: ${have:-no usable venv})"
        rm -rf -- "$VENV"
        "$uv_bin" venv -q -p "${REALVLLM_PYTHON_VERSION:-3.11}" "$VENV" >&2
        "$uv_bin" pip install -p "$PY" "vllm==$VERSION" >&2
    fi
    have=$(installed_version)
    if [ -z "$have" ] || { [ "$VERSION" != nightly ] && [ "$have" != "$VERSION" ]; }; then
        log "vllm in $VENV reports '${have}', expected $VERSION"
        exit 1
    fi
    log "vllm $have ready in $(( $(date +%s) - start ))s"
fi
echo "$PY"

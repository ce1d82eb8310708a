#!/bin/bash
# Device side of the systemd mode (docs/gpu-validation.md, "Self-healing under real systemd", has the whole recipe): one script, three verbs.
#
#   bash tests/gpu/systemd/device.sh stash      keep what this call carried (.gpukit/part.*, bundle.sha256,
#                                               whl/, render/, .debs/) under /srv/vf: the repo copy's ignored
#                                               paths do not survive between device calls
#   bash tests/gpu/systemd/device.sh prepare    stash, then once each: vLLM into the service venv, systemd 252
#                                               in its namespace (sysd.sh), the tiny model
#   bash tests/gpu/systemd/device.sh measure [BUDGET_S]
#                                               stash, the small wheels into the venv, then selfheal.py inside
#                                               the namespace for BUDGET_S seconds (default 540); results in $OUT
#
# VLLM_FLEET_GPU_TORCH_PY: the Python whose site-packages hold torch (lent to the service venv, and it runs the helpers);
# the default is where the GPU machine's image has it (docs/gpu-validation.md). prepare and measure stop when it is absent.
#
# Everything lives under /srv and the layout's own paths (/opt/vllm-fleet, /var/lib/vllm-fleet, /etc):
# nothing under /tmp, which a booting systemd may empty.
set -uo pipefail
T0=$(date +%s)
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
V=/srv/vf; mkdir -p $V/kit $V/out $V/state
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TORCH_PY=${VLLM_FLEET_GPU_TORCH_PY:-/opt/torch/.venv/bin/python3}
log() { echo "$(date +%T) device.sh: $*"; }

need_torch_py() {
  [ -x "$TORCH_PY" ] && return 0
  echo "device.sh: no Python with torch at $TORCH_PY (VLLM_FLEET_GPU_TORCH_PY$([ -n "${VLLM_FLEET_GPU_TORCH_PY:-}" ] || echo ' unset: the GPU image'"'"'s default')): set VLLM_FLEET_GPU_TORCH_PY to a python3 whose site-packages hold torch" >&2
  return 1
}

stash() {
  local n=0
  for f in "$REPO"/.gpukit/part.* "$REPO"/.gpukit/bundle.sha256; do [ -f "$f" ] && cp "$f" $V/kit/ && n=$((n+1)); done
  [ -d "$REPO/.gpukit/whl" ] && { rm -rf $V/whl; cp -r "$REPO/.gpukit/whl" $V/whl; n=$((n+1)); }
  [ -d "$REPO/.gpukit/render" ] && { rm -rf $V/render; cp -r "$REPO/.gpukit/render" $V/render; n=$((n+1)); }
  [ -d "$REPO/.debs" ] && { rm -rf $V/debs; cp -r "$REPO/.debs" $V/debs; n=$((n+1)); }
  cp "$REPO"/tests/gpu/systemd/selfheal.py "$REPO"/tests/gpu/systemd/sysd.sh "$REPO"/tests/gpu/make_tiny_model.py $V/
  log "stashed $n items; kit: $(cd $V/kit && ls | tr '\n' ' ')"
}

venv_path() { $TORCH_PY -c 'import json; print(json.load(open("/srv/vf/render/dirs.json"))["venv"])'; }

site_of() { "$1/bin/python3" -c 'import site; print(site.getsitepackages()[0])'; }

prepare() {
  local VENV SITE TSITE
  VENV=$(venv_path)
  if [ -x "$VENV/bin/vllm" ] && [ -f "$(site_of "$VENV")/vllm/__init__.py" ]; then log "vLLM already in $VENV"; else
    local t=$(date +%s)
    ls $V/kit/part.0 $V/kit/part.1 $V/kit/part.2 >/dev/null || return 1
    # the service venv, as python_env would build it on this image: its python is the image's, torch from the image
    mkdir -p "$(dirname "$VENV")"
    $TORCH_PY -m venv --without-pip "$VENV" || return 1
    SITE=$(site_of "$VENV")
    TSITE=$($TORCH_PY -c 'import site; print(site.getsitepackages()[0])')
    echo "import site; site.addsitedir('$TSITE')" > "$SITE/vf-image-torch.pth"
    (cd $V/kit && cat part.0 part.1 part.2 > bundle.tar && echo "$(cat bundle.sha256)  bundle.tar" | sha256sum -c - \
      && tar -xf bundle.tar && sha256sum -c SHA256SUMS) || return 1
    tar -xJf $V/kit/vllm-nofa2.tar.xz -C "$SITE" || return 1
    xz -dc $V/kit/_vllm_fa2_C.abi3.so.xz > "$SITE/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" || return 1
    chmod 755 "$SITE/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"
    rm -f $V/kit/bundle.tar $V/kit/vllm-nofa2.tar.xz $V/kit/_vllm_fa2_C.abi3.so.xz
    # pip's console-script launcher, with the __main__ guard (the engine core starts with multiprocessing spawn)
    printf '#!%s\nimport sys\nfrom vllm.entrypoints.cli.main import main\nif __name__ == "__main__":\n    sys.exit(main())\n' \
      "$VENV/bin/python3" > "$VENV/bin/vllm"
    chmod 755 "$VENV/bin/vllm"; chmod -R a+rX /opt/vllm-fleet
    log "vLLM 0.25.0 into $VENV in $(( $(date +%s) - t )) s"
  fi
  bash $V/sysd.sh $V/debs 2>&1 | tail -4
  local M; M=$($TORCH_PY -c 'import json; print(json.load(open("/srv/vf/render/dirs.json"))["model_dir"])')
  if [ -f "$M/model.safetensors" ]; then log "tiny model already at $M"; else
    local t=$(date +%s)
    $TORCH_PY $V/make_tiny_model.py "$M" > $V/out/make_tiny_model.log 2>&1 || { tail -20 $V/out/make_tiny_model.log; return 1; }
    log "tiny model at $M in $(( $(date +%s) - t )) s: $(ls "$M" | tr '\n' ' ')"
  fi
}

measure() {
  local VENV SITE; VENV=$(venv_path); SITE=$(site_of "$VENV") || return 1
  if [ ! -f $V/state/wheels ]; then
    $TORCH_PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $V/whl/*.whl \
      || return 1
    chmod -R a+rX /opt/vllm-fleet; touch $V/state/wheels
    "$VENV/bin/python3" -c 'import sys, vllm, torch, transformers, pydantic; print(sys.executable, "vllm", vllm.__version__, "torch", torch.__version__, "pydantic", pydantic.__version__)'
  fi
  local left=$(( ${1:-540} - ($(date +%s) - T0) ))
  log "selfheal.py with ${left} s"
  nsx /usr/bin/python3 $V/selfheal.py $V/render $V/out "$left"
}

case "${1:-}" in
  stash) stash ;;
  prepare) need_torch_py && stash && prepare ;;
  measure) need_torch_py && stash && measure "${2:-540}"; rc=$?
    # at most 8 files come back
    for f in results.json journal-cold.txt journal-vllm.txt journal-watchdog.txt journal-devices.txt gates.txt; do [ -f $V/out/$f ] && cp $V/out/$f "$OUT/"; done
    exit $rc ;;
  *) echo "usage: $0 stash|prepare|measure [BUDGET_S]" >&2; exit 2 ;;
esac

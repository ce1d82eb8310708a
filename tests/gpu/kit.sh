#!/bin/bash
# Device side of the GPU smoke kit: vLLM 0.25.0 and its extra wheels onto a GPU machine without network.
#
#   bash tests/gpu/kit.sh stash     keep this call's bundle part(s) from .gpukit/ in $KIT (ignored paths
#                                   of the repo copy do not survive between device calls; /tmp does)
#   bash tests/gpu/kit.sh install   reassemble the parts, check the sha256, extract vLLM into $SITE,
#                                   install the small wheels there, write the launcher $VROOT/bin/vllm
#
# The kit is made on the control machine by tests/gpu/make_kit.sh (docs/gpu-validation.md).
# It holds no FlashInfer: smoke.py renders the launch with vllm_flashinfer_sampler = False.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SRC=${SRC:-$REPO/.gpukit}
KIT=${KIT:-/tmp/vf-kit}
SITE=${SITE:-/tmp/site}
VROOT=${VROOT:-/tmp/vroot}
mkdir -p "$KIT"
if ls "$SRC"/part.* >/dev/null 2>&1; then cp "$SRC"/part.* "$KIT"/; fi
ls -la "$KIT"
[ "${1:-}" = stash ] && exit 0
[ "${1:-}" = install ] || { echo "usage: $0 stash|install" >&2; exit 2; }
if [ -x "$VROOT/bin/vllm" ] && [ -f "$SITE/vllm/__init__.py" ]; then echo "already installed"; exit 0; fi
t0=$(date +%s)
cd "$KIT"
cat part.* > bundle.tar
echo "$(cat "$SRC/bundle.sha256")  bundle.tar" | sha256sum -c -
tar -xf bundle.tar   # vllm-nofa2.tar.xz, _vllm_fa2_C.abi3.so.xz, SHA256SUMS
sha256sum -c SHA256SUMS
mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$SRC"/whl/*.whl
tar -xJf vllm-nofa2.tar.xz -C "$SITE"
xz -dc _vllm_fa2_C.abi3.so.xz > "$SITE/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"
chmod 755 "$SITE/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"
rm -f bundle.tar part.*
# pip's console-script launcher, with the __main__ guard: the engine core starts with multiprocessing spawn.
mkdir -p "$VROOT/bin"
cat > "$VROOT/bin/vllm" <<PY
#!$(command -v python3)
import sys
sys.path.insert(0, "$SITE")
from vllm.entrypoints.cli.main import main
if __name__ == "__main__":
    sys.exit(main())
PY
chmod 755 "$VROOT/bin/vllm"
PYTHONPATH="$SITE" python3 -c 'import vllm, torch, transformers, pydantic; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__, "pydantic", pydantic.__version__)'
echo "installed in $(( $(date +%s) - t0 )) s"

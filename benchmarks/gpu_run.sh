#!/usr/bin/env bash
# The one command for the GPU machine: install the missing pure-python packages from .whl/ (no
# network there), then run each benchmark step under `timeout`, writing results into "$OUT".
#
#   bash benchmarks/gpu_run.sh            # from the repository root (run tool: carry [".whl"])
#
# lmforge runs from this checkout through PYTHONPATH (no `pip install -e .`, no console script).
# A failing step does not stop the others; the end prints one summary. What comes back from $OUT
# (at most 8 files): gpu_check.json, the other steps' JSON files, logs.tar.gz (every step's log
# and the logs of failed gpu_check stages).
set -u -o pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_run_out}
mkdir -p "$OUT"
LOGS=/tmp/gpu_run_logs
rm -rf "$LOGS" && mkdir -p "$LOGS"
T0=$(date +%s)
SUMMARY=()

export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LMFORGE_HOME=/tmp/lmforge_home

# step NAME TIMEOUT_S CMD...: run CMD under timeout, its output to $LOGS/NAME.log (and here)
step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s) rc
  echo "=== [$(( t0 - T0 ))s] step $name (timeout ${limit}s): $*"
  timeout -k 15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  local secs=$(( $(date +%s) - t0 ))
  local what=ok
  [ "$rc" = 0 ] || what="FAILED rc=$rc"
  [ "$rc" = 124 ] && what="TIMEOUT after ${limit}s"
  echo "=== step $name: $what (${secs}s)"
  SUMMARY+=("$(printf '%-22s %-22s %5ss' "$name" "$what" "$secs")")
  return 0
}

# -- install -------------------------------------------------------------------------------------
install_wheels() {
  shopt -s nullglob
  local whls=(.whl/*.whl)
  if [ ${#whls[@]} -eq 0 ]; then
    echo "no wheels in $ROOT/.whl (pass carry [\".whl\"] to the run tool); using what is installed"
  else
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${whls[@]}"; then
      echo "installing all wheels at once failed; one at a time:"
      for w in "${whls[@]}"; do
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$w" \
          || echo "  could not install $w"
      done
    fi
  fi
  python3 - <<'EOF'
import importlib, sys
bad = []
for m in ("torch", "fastapi", "uvicorn", "starlette", "pydantic", "gguf", "snowballstemmer", "pypdf", "httpx",
          "tokenizers", "safetensors", "jinja2", "yaml", "tqdm", "matplotlib", "numpy", "transformers"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m:16s} {getattr(mod, '__version__', '?'):14s} {getattr(mod, '__file__', '')}")
    except Exception as e:
        bad.append(m)
        print(f"  {m:16s} MISSING: {type(e).__name__}: {e}")
sys.exit(1 if bad else 0)
EOF
}

machine_info() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cpus: $(nproc)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | head -3
  echo "python: $(python3 --version 2>&1)  cc: $(command -v cc gcc 2>/dev/null | head -1 || echo none)"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  python3 -m lmforge.cli.main --version
  git rev-parse HEAD 2>/dev/null || echo "(no git here)"
}

export -f install_wheels machine_info
step install 180 bash -c install_wheels
step machine 120 bash -c machine_info

# -- benchmarks ----------------------------------------------------------------------------------
# in order of importance: one device call has at most 600 s, start-up not included
# the CUDA-only tests (CUDA-graph decoding: capture, replay, parity with the eager path)
step cuda_tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_fast_cuda_graph.py -rs
# pretraining tokens/s of the gpt2-small shape beside transformers, and CPU/GPU loss parity
step pretrain_gpu 240 python3 benchmarks/pretrain_gpu.py --out "$OUT/pretrain_gpu.json"
# batch-1 decode of the default model's shape: CUDA graphs vs eager vs transformers generate
step decode_gpu 90 python3 benchmarks/decode_gpu.py --out "$OUT/decode_gpu.json"
# every stage on CUDA (GPU_CHECK_DEVICE=cpu runs the same flow small on a CPU, to try this script)
step gpu_check ${GPU_CHECK_TIMEOUT:-300} python3 benchmarks/gpu_check.py --device "${GPU_CHECK_DEVICE:-cuda}" \
  --budget ${GPU_CHECK_BUDGET:-260} --out-dir "$OUT"

# -- collect -------------------------------------------------------------------------------------
# everything but the top-level JSON files goes into one tarball (few files come back)
mkdir -p "$LOGS/out_extra"
find "$OUT" -mindepth 1 -maxdepth 1 ! -name '*.json' ! -name 'logs.tar.gz' -exec mv {} "$LOGS/out_extra/" \;
tar -czf "$OUT/logs.tar.gz" -C /tmp gpu_run_logs 2>/dev/null || echo "could not write logs.tar.gz"

echo
echo "================ summary ($(( $(date +%s) - T0 ))s) ================"
for line in "${SUMMARY[@]}"; do echo "$line"; done
if [ -f "$OUT/gpu_check.json" ]; then
  echo
  python3 benchmarks/gpu_check.py --table-from "$OUT/gpu_check.json"
fi
echo
echo "files in \$OUT:"
ls -la "$OUT"

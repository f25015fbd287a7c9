#!/usr/bin/env bash
# The GPU checks of docs/performance.md in one run, on a machine with a CUDA GPU and a CUDA build of
# torch: the CUDA tests (values of the multi-tensor path on the device, zero host syncs per step
# under torch.cuda.set_sync_debug_mode("error")), the kernels launched per step, then the overhead
# of GPT-2 small and ResNet-50 in bf16, eager and compiled. Every part writes its output to a file
# in the results folder, so what finished is kept if the machine is taken back midway; a part that
# fails does not stop the others.
#
#   bash benchmarks/gpu_checks.sh [RESULTS_DIR] [PAIRS]     # default: gpu-results, 50 pairs (a flush included)
#
# About 6 minutes on one H200 (compilation included); each part has its own time limit. The figures
# go into docs/performance.md ("Results (GPU)").
set -u
out="${1:-gpu-results}"
pairs="${2:-50}"
mkdir -p "$out"
cd "$(dirname "$0")/.."

run() {  # name, timeout in seconds, command...
  local name="$1" limit="$2"
  shift 2
  echo "== $name: $*" | tee -a "$out/summary.txt"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  tail -n 12 "$out/$name.txt" | sed 's/^/   /' | tee -a "$out/summary.txt"
}

"${PYTHON:-python3}" - >"$out/device.txt" 2>&1 <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
try:
    import triton
    print("triton", triton.__version__, "(sampled steps: the one-pass kernel of gradscope/capture/triton_moments.py)")
except ImportError:
    print("triton: not installed (sampled steps: the multi-tensor path)")
EOF
cat "$out/device.txt" | tee -a "$out/summary.txt"
if ! grep -q "available True" "$out/device.txt"; then
  echo "No CUDA device (or a CPU build of torch): nothing to measure here." | tee -a "$out/summary.txt"
  exit 2
fi

py="${PYTHON:-python3}"
# In order of what matters most, so a run stopped midway keeps the most important figures.
run cuda-tests 150 "$py" -m pytest -q -p no:cacheprovider tests/integration/test_gpu.py tests/core/test_op_count.py
run launches 60 "$py" benchmarks/gpu_launches.py
run overhead-bf16-eager 150 "$py" benchmarks/overhead.py --device cuda --dtype bf16 --pairs "$pairs" \
  --variants gradscope,gradscope-tb
run overhead-bf16-compiled 130 "$py" benchmarks/overhead.py --device cuda --dtype bf16 --pairs "$pairs" --compile \
  --variants gradscope --workloads gpt2-small,resnet50
run overhead-bf16-compiled-hf 100 "$py" benchmarks/overhead.py --device cuda --dtype bf16 --pairs "$pairs" --compile \
  --variants gradscope --workloads hf-gpt2-small
# the same defaults with the sampled steps on the multi-tensor path (what the Triton kernel saves)
GRADSCOPE_TRITON=off run overhead-bf16-eager-no-triton 100 "$py" benchmarks/overhead.py --device cuda --dtype bf16 \
  --pairs "$pairs" --variants gradscope --workloads gpt2-small,resnet50
# the compiled resnet50's 1.1 ms per ordinary step (not explained yet): more kernels, or a host sync?
run launches-compiled 150 "$py" benchmarks/gpu_launches.py --compile --workloads resnet50,gpt2-small
run overhead-bf16-every-step 60 "$py" benchmarks/overhead.py --device cuda --dtype bf16 --pairs "$pairs" \
  --variants gradscope-all-every-step --workloads gpt2-small,resnet50

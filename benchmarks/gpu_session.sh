#!/usr/bin/env bash
# Everything a GPU session checks, in one call on the device machine (torch and triton already
# installed there, nothing from a registry): the whole test suite on CUDA (kernel tests put
# their tensors on the GPU, `gpu`-marked tests run), then the benchmark report.
#
#   bash benchmarks/gpu_session.sh "$OUT"      # logs, JSON and markdown land in $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=.
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$out/versions.txt"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -n 200 > "$out/tests.log"; tests_rc=${PIPESTATUS[0]}
python3 benchmarks/run.py --out-dir "$out" > "$out/run.log" 2>&1; run_rc=$?
tail -n 3 "$out/tests.log"; tail -n 40 "$out/run.log"
echo "tests rc=$tests_rc, run.py rc=$run_rc"
exit $(( tests_rc || run_rc ))

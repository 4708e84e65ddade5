#!/usr/bin/env bash
# What a GPU session checks, on the device machine (torch and triton already installed there,
# nothing from a registry), in parts that each fit one 10-minute device call:
#
#   bash benchmarks/gpu_session.sh OUT tests             # the whole suite on CUDA
#   bash benchmarks/gpu_session.sh OUT bench 'REGEX' [run.py options, e.g. --skip compile-max-autotune]
#   bash benchmarks/gpu_session.sh OUT all               # both, every row (longer than one call)
#
# The tests run with FASTGEN_AUTOTUNE=0 (the default tile, no per-shape timing: hundreds of
# test shapes would each pay the candidates' compiles); the report tunes as users do.
# Logs, JSON and markdown land in OUT; a bench part's files are tagged with its regex.
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: gpu_session.sh OUT_DIR tests|bench REGEX [run.py options]|all"
out=${1:?$usage}
part=${2:-all}
only=${3:-}
run_options=("${@:4}")
case $part in
    tests|all) ;;
    bench) [[ -n $only ]] || { echo "bench needs a REGEX: every row does not fit one call; $usage" >&2; exit 2; } ;;
    *) echo "unknown part '$part'; $usage" >&2; exit 2 ;;
esac
tag=$(printf '%s' "$only" | tr -c 'A-Za-z0-9' '-')
mkdir -p "$out"
export PYTHONPATH=.
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$out/versions.txt"
tests_rc=0
run_rc=0
if [[ $part == tests || $part == all ]]; then
    FASTGEN_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -n 200 > "$out/tests.log"
    tests_rc=${PIPESTATUS[0]}
    tail -n 3 "$out/tests.log"
fi
if [[ $part == bench || $part == all ]]; then
    python3 benchmarks/run.py --out-dir "$out" --only "$only" --tag "$only" ${run_options[@]+"${run_options[@]}"} > "$out/run-$tag.log" 2>&1
    run_rc=$?
    tail -n 60 "$out/run-$tag.log"
fi
echo "tests rc=$tests_rc, run.py rc=$run_rc"
exit $(( tests_rc || run_rc ))

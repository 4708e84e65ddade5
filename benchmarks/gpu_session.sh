#!/usr/bin/env bash
# One GPU session in one command, inside the ~15 minutes a GPU is lent for (under 9 by plan):
#
#   bash benchmarks/gpu_session.sh OUT              # the GPU-marked tests and the report rows
#   bash benchmarks/gpu_session.sh OUT --dry-run    # the plan: phases, jobs, rows, seconds
#   bash benchmarks/gpu_session.sh OUT --with fp32,max-autotune --budget-s 1800   # a longer lease
#
# Facts (NVML), a parallel compile of every row on a fresh cache beside the GPU tests
# (FASTGEN_AUTOTUNE=0), the rows timed one at a time, then OUT/summary.md: each phase has a hard
# limit, so the summary is always written inside the budget. benchmarks/session.py has the
# phases; benchmarks/plan.py the cost of each. Runs on the device machine's python3, nothing
# installed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
exec "${PYTHON:-python3}" -m benchmarks.session "$@"

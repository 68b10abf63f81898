#!/usr/bin/env bash
# Builds the CUDA extension flashrt_core/_kernels*.so in place (dev boxes, GPU machine;
# no colcon needed). Uses the python on PATH (or $PYTHON) for pybind11 and the ABI.
#   FLASHRT_CUDA_ARCHS  CUDA archs, e.g. "90" or "89;90;120" (default: native when a
#                       GPU is visible, else 90)
#   FLASHRT_BUILD_DIR   build tree (default build/kernels)
#   FLASHRT_PTXAS_VERBOSE=1  print registers / spills per kernel
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUILD_DIR="${FLASHRT_BUILD_DIR:-$ROOT/build/kernels}"

if [[ -z "${FLASHRT_CUDA_ARCHS:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    FLASHRT_CUDA_ARCHS=native
  else
    FLASHRT_CUDA_ARCHS=90
  fi
fi
command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]] || {
  echo "build_kernels: nvcc not found (install the CUDA toolkit)" >&2; exit 1; }
command -v nvcc >/dev/null 2>&1 || export PATH="/usr/local/cuda/bin:$PATH"
"$PYTHON" -m pybind11 --cmakedir >/dev/null 2>&1 || {
  echo "build_kernels: pybind11 missing for $PYTHON (pip install pybind11)" >&2; exit 1; }

GENERATOR=()
command -v ninja >/dev/null 2>&1 && GENERATOR=(-G Ninja)
VERBOSE=OFF
[[ "${FLASHRT_PTXAS_VERBOSE:-0}" == 1 ]] && VERBOSE=ON

cmake -S "$ROOT/cuda_src" -B "$BUILD_DIR" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
  -DFLASHRT_CUDA_ARCHS="$FLASHRT_CUDA_ARCHS" \
  -DFLASHRT_KERNELS_INSTALL_DIR="$ROOT/flashrt_core" \
  -DFLASHRT_PTXAS_VERBOSE="$VERBOSE" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
ls "$ROOT"/flashrt_core/_kernels*.so

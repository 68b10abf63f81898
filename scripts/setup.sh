#!/usr/bin/env bash
# From nothing to a built workspace: virtual environment .venv, ROS 2 Jazzy (a real
# /opt/ros install when there is one, else the PyPI wheels), colcon, torch and the
# engine's packages, `colcon build`, and the demo checkpoint in .cache/.
# Idempotent: a second run checks stamps, rebuilds incrementally and changes nothing.
#
# Environment knobs:
#   FLASHRT_PYTHON    interpreter for the venv (default: python3, >= 3.10)
#   FLASHRT_ROS=wheels  use the PyPI wheels even where /opt/ros/<distro> exists
#   FLASHRT_PIP_ARGS  extra pip arguments (e.g. "--no-index --find-links .whl")
#   FLASHRT_ENGINE_DEPS=system  install only ROS + colcon; take torch, numpy, transformers...
#                     from the interpreter as they are (an offline GPU box with its own stack)
#   FLASHRT_VENV      venv location (default: .venv in the repository)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${FLASHRT_VENV:-$ROOT/.venv}"
export FLASHRT_VENV="$VENV"
START_SECONDS=$SECONDS

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }
sha() { sha256sum | cut -c1-16; }

# Two setups in one tree at once (two terminals) would trample each other's build.
mkdir -p .cache
exec 9>.cache/setup.lock
flock 9

# --- which ROS 2 -------------------------------------------------------------------
# Prints the ROS prefix to use: the venv (PyPI wheels), /opt/ros/<distro>, or
# "sourced" (a ROS workspace already sourced in this shell, outside /opt/ros).
ros_prefix() {
  if [ "${FLASHRT_ROS:-}" = wheels ]; then echo "$VENV"; return; fi
  if [ -n "${ROS_DISTRO:-}" ] && [ -n "${AMENT_PREFIX_PATH:-}" ] \
     && [[ ":$AMENT_PREFIX_PATH:" != *":$VENV:"* ]]; then
    if [ -f "/opt/ros/$ROS_DISTRO/setup.bash" ]; then echo "/opt/ros/$ROS_DISTRO"; else echo sourced; fi
    return
  fi
  local setup
  for setup in /opt/ros/jazzy/setup.bash /opt/ros/*/setup.bash; do
    if [ -f "$setup" ]; then dirname "$setup"; return; fi
  done
  echo "$VENV"
}
ROS_PREFIX="$(ros_prefix)"
if [ "$ROS_PREFIX" = "$VENV" ]; then
  say "ROS 2 Jazzy from PyPI wheels (in $VENV)"
else
  say "ROS 2 from ${ROS_PREFIX/sourced/the sourced environment} (${ROS_DISTRO:-$(basename "$ROS_PREFIX")})"
  if [ "$ROS_PREFIX" != sourced ] && [ -z "${AMENT_PREFIX_PATH:-}" ]; then
    set +u; source "$ROS_PREFIX/setup.bash"; set -u
  fi
fi

# --- virtual environment -----------------------------------------------------------
PYTHON="${FLASHRT_PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH (set FLASHRT_PYTHON)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1); Python >= 3.10 is needed (set FLASHRT_PYTHON)"

# A CUDA torch the interpreter already has is kept (a GPU box); so are a real ROS
# install's Python packages (rclpy, and the numpy its messages were compiled against).
has_cuda_torch() { "$1" -c 'import sys, torch; sys.exit(not torch.version.cuda)' 2>/dev/null; }
SYSTEM_SITE=0
if [ "$ROS_PREFIX" != "$VENV" ] || has_cuda_torch "$PYTHON"; then SYSTEM_SITE=1; fi

recorded_prefix="$(cat "$VENV/flashrt-ros-prefix" 2>/dev/null || true)"
if [ -x "$VENV/bin/python" ] && [ -n "$recorded_prefix" ] && [ "$recorded_prefix" != "$ROS_PREFIX" ]; then
  say "ROS changed ($recorded_prefix -> $ROS_PREFIX): recreating $VENV and the build"
  rm -rf "$VENV" build install log
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV ($("$PYTHON" -V 2>&1)$([ $SYSTEM_SITE = 1 ] && echo ', with system site-packages'))"
  venv_args=()
  [ $SYSTEM_SITE = 1 ] && venv_args+=(--system-site-packages)
  "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
  # --system-site-packages reaches the base interpreter's packages only: where $PYTHON is
  # itself a venv (a GPU box's torch venv), layer over that venv's packages too.
  if [ $SYSTEM_SITE = 1 ]; then
    parent_site="$("$PYTHON" -c 'import sys, sysconfig
if sys.prefix != sys.base_prefix: print(*sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}), sep="\n")')"
    if [ -n "$parent_site" ]; then
      echo "$parent_site" >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/flashrt-parent-env.pth"
    fi
  fi
fi
echo "$ROS_PREFIX" >"$VENV/flashrt-ros-prefix"
touch "$VENV/COLCON_IGNORE" .cache/COLCON_IGNORE   # not ROS packages of this workspace
PY="$VENV/bin/python"

# --- Python packages ---------------------------------------------------------------
# Packages the interpreter already has that must stay as they are: a CUDA torch, and
# a real ROS install's numpy (its message modules are compiled against it). They are
# left out of the install and pinned, so no other package's dependency replaces them.
keep=()
has_cuda_torch "$PY" && keep+=(torch)
if [ "$ROS_PREFIX" != "$VENV" ] && "$PY" -c 'import numpy' 2>/dev/null; then keep+=(numpy); fi
req_files=()
[ "${FLASHRT_ENGINE_DEPS:-}" = system ] || req_files+=(requirements/engine.txt)
if [ "$ROS_PREFIX" = "$VENV" ]; then
  req_files+=(requirements/ros.txt requirements/colcon.txt)
elif ! command -v colcon >/dev/null; then
  req_files+=(requirements/colcon.txt)
fi
requirements="$(cat "${req_files[@]}" | sed 's/#.*//; /^[[:space:]]*$/d')"
pins=""
for name in "${keep[@]}"; do
  requirements="$(grep -Ev "^$name([=<>~!\[ ]|$)" <<<"$requirements")"
  pins+="$name==$("$PY" -c "import $name; print($name.__version__)")"$'\n'
done
stamp="$(printf '%s\n%s\n%s\n%s\n%s\n' "$requirements" "$pins" "$ROS_PREFIX" \
         "$("$PY" -V 2>&1)" "${FLASHRT_PIP_ARGS:-}" | sha)"
if [ "$(cat "$VENV/flashrt-requirements.stamp" 2>/dev/null)" != "$stamp" ]; then
  say "installing Python packages (${req_files[*]}${keep[*]:+; keeping installed ${keep[*]}})"
  pip_dir="$(mktemp -d)"; trap 'rm -rf "$pip_dir"' EXIT
  echo "$requirements" >"$pip_dir/requirements.txt"
  printf '%s' "$pins" >"$pip_dir/constraints.txt"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --disable-pip-version-check ${FLASHRT_PIP_ARGS:-} \
      -r "$pip_dir/requirements.txt" -c "$pip_dir/constraints.txt" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  echo "$stamp" >"$VENV/flashrt-requirements.stamp"
else
  say "Python packages up to date"
fi

# --- CMake path fix (PyPI wheels only) -----------------------------------------------
# Some wheels' CMake exports name the wheel build host's Python and numpy include
# dirs (/opt/python/cp3XX-cp3XX/...); rosidl's generate step needs the local ones.
if [ "$ROS_PREFIX" = "$VENV" ]; then
  mapfile -t stale < <(grep -rlE '/opt/python/cp3[0-9]+-cp3[0-9]+' --include='*.cmake' "$VENV/share" || true)
  if [ ${#stale[@]} -gt 0 ]; then
    py_include="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    np_include="$("$PY" -c 'import numpy; print(numpy.get_include())')"
    [ -f "$py_include/Python.h" ] || die "no Python.h in $py_include (install the Python development headers)"
    say "pointing ${#stale[@]} CMake exports at $py_include"
    sed -i -E \
      -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/(_core/)?include#$np_include#g" \
      -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#$py_include#g" \
      "${stale[@]}"
  fi
fi

# --- colcon build ------------------------------------------------------------------
set +u; source scripts/env.sh; set -u
say "colcon build"
# --symlink-install: edits to installed Python files need no rebuild (new files do).
colcon build --paths "$ROOT" --symlink-install \
    --cmake-args -DPython3_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release 2>&1 \
  | { grep -v "in the environment variable AMENT_PREFIX_PATH doesn't contain any 'local_setup" || true; }
set +u; source install/local_setup.bash; set -u

# --- demo checkpoint ---------------------------------------------------------------
# Random weights in the real Pi0.5 layout (tiny dims); rewritten when the engine's
# code that writes it changes.
CKPT=.cache/checkpoints/pi05_tiny
synthetic_rc=0
"$PY" - <<'PYTHON' || synthetic_rc=$?
import importlib.util, sys
try:
    found = importlib.util.find_spec("flashrt_core.synthetic") is not None
except Exception as exc:  # flashrt_core itself fails to import
    print(f"[setup] error: flashrt_core does not import: {exc!r}", file=sys.stderr)
    sys.exit(2)
sys.exit(0 if found else 1)
PYTHON
if [ $synthetic_rc = 1 ]; then
  say "demo checkpoint pending (flashrt_core.synthetic not in this build yet)"
elif [ $synthetic_rc != 0 ]; then
  exit 1
else
  engine_hash="$(find flashrt_core -name '*.py' -print0 | sort -z | xargs -0 cat | sha)"
  if [ "$(cat "$CKPT/.flashrt-stamp" 2>/dev/null)" != "$engine_hash" ]; then
    say "writing demo checkpoint $CKPT"
    rm -rf "$CKPT.tmp"
    "$PY" -c 'import sys; from flashrt_core.synthetic import write_checkpoint; write_checkpoint("pi05", sys.argv[1], size="tiny", seed=0)' "$CKPT.tmp"
    echo "$engine_hash" >"$CKPT.tmp/.flashrt-stamp"
    rm -rf "$CKPT" && mv "$CKPT.tmp" "$CKPT"
  fi
fi

say "ready in $((SECONDS - START_SECONDS)) s (use it in a shell: source scripts/env.sh)"

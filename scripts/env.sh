# Source me (bash): `source scripts/env.sh` gives the environment scripts/setup.sh
# built: the virtual environment, the ROS 2 prefix (a real /opt/ros install or the
# venv's PyPI wheels), and the colcon install space when it exists.
# scripts/setup.sh records which ROS it used in .venv/flashrt-ros-prefix: the venv
# itself (wheels), /opt/ros/<distro>, or "sourced" (a ROS workspace the user sources).

_flashrt_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLASHRT_VENV="${FLASHRT_VENV:-$_flashrt_root/.venv}"

if [ ! -x "$FLASHRT_VENV/bin/python" ]; then
  echo "flashrt_ros: no environment at $FLASHRT_VENV; run scripts/setup.sh first" >&2
  return 1 2>/dev/null || exit 1
fi

# ROS's and colcon's setup scripts read unset variables: no `set -u` while sourcing.
_flashrt_saved_opts="$-"
set +u

# prepend PATH-like variable $1 with $2 unless already there
_flashrt_prepend() {
  case ":${!1:-}:" in
    *":$2:"*) ;;
    *) export "$1=$2${!1:+:${!1}}" ;;
  esac
}

_flashrt_ros_prefix="$(cat "$FLASHRT_VENV/flashrt-ros-prefix" 2>/dev/null || echo "$FLASHRT_VENV")"
if [ "$_flashrt_ros_prefix" = "$FLASHRT_VENV" ]; then
  # ROS 2 Jazzy from PyPI wheels: the venv prefix is the ROS prefix.
  _flashrt_prepend AMENT_PREFIX_PATH "$FLASHRT_VENV"
  _flashrt_prepend CMAKE_PREFIX_PATH "$FLASHRT_VENV"
  export ROS_DISTRO="${ROS_DISTRO:-jazzy}"
  export ROS_VERSION=2
elif [ "$_flashrt_ros_prefix" != sourced ] && { [ -z "${AMENT_PREFIX_PATH:-}" ] || [ "${ROS_DISTRO:-}" != "$(basename "$_flashrt_ros_prefix")" ]; }; then
  # A real ROS install (/opt/ros/<distro>) not sourced in this shell yet.
  # shellcheck disable=SC1091
  source "$_flashrt_ros_prefix/setup.bash"
fi

export VIRTUAL_ENV="$FLASHRT_VENV"
_flashrt_prepend PATH "$FLASHRT_VENV/bin"

if [ -f "$_flashrt_root/install/local_setup.bash" ]; then
  # shellcheck disable=SC1091
  source "$_flashrt_root/install/local_setup.bash"
fi

case "$_flashrt_saved_opts" in *u*) set -u ;; esac
unset -f _flashrt_prepend
unset _flashrt_saved_opts _flashrt_ros_prefix _flashrt_root

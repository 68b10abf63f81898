#!/usr/bin/env bash
# Set up (idempotent), then run the built-in demo: the Pi0.5 policy node on the demo
# checkpoint, fed by a synthetic camera + joint-state publisher, printing action
# chunks; ends after --duration seconds (or Ctrl-C) with a summary.
# Arguments go to `flashrt-ros demo` (--duration S, --model NAME).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
set +u; source scripts/env.sh; set -u
# Everything runs in this one process: keep DDS discovery on this machine.
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
exec flashrt-ros demo "$@"

#!/usr/bin/env bash
# Set up (idempotent), then run the test suite; arguments go to pytest.
#   ./scripts/test.sh                 everything (GPU tests skip without CUDA)
#   ./scripts/test.sh -m "not slow"   ...
#   ./scripts/test.sh test/test_cli.py -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
set +u; source scripts/env.sh; set -u
# pytest under the venv's interpreter (which also sees a ROS install's packages), with
# the working directory taken off sys.path: `python -m pytest` would put the source
# tree first, and the source flashrt_ros/ (no generated messages) would hide the
# installed one. (The venv's `pytest` executable does the same where it exists; in a
# venv over a ROS install pytest may come from the system instead.)
exec "$FLASHRT_VENV/bin/python" -c 'import sys; del sys.path[0]; import pytest; sys.exit(pytest.main())' "$@"

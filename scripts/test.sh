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
# The `pytest` executable, not `python -m pytest`: the latter puts the source tree
# first on sys.path, and the source flashrt_ros/ (no generated messages) would hide
# the installed one.
exec pytest "$@"

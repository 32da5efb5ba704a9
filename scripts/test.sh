#!/usr/bin/env bash
# Set up a fresh machine and run the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the longer tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
(cd rustbpe && cargo test --quiet --release)
uv run --frozen pytest "$@"

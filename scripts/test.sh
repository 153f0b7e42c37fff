#!/usr/bin/env bash
# Set the machine up (scripts/setup.sh), then lint and run the whole test suite; arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
echo "test: .venv/bin/ruff check ."
.venv/bin/ruff check .
echo "test: .venv/bin/pytest $*"
exec .venv/bin/pytest "$@"

#!/usr/bin/env bash
# The whole test suite, as CI runs it: install, lint, then every test including the slow ones
# that use the real 7.2 kernel tree (cached under ~/.cache/kseries, built cold when absent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
.venv/bin/invoke doctor  # every tool the stages run works, or the line naming its fix
.venv/bin/ruff check .
exec .venv/bin/pytest -ra "$@"

#!/usr/bin/env bash
# The main job on the embedded default: install, prepare the 7.2 tree, rebase the series.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
exec .venv/bin/invoke pipeline "$@"

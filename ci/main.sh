#!/usr/bin/env bash
# The main job on the embedded default (invoke pipeline): install, prepare the 7.2 tree, rebase
# the series (and the QEMU series the pair uses), check every commit, build, boot base vs series
# on the three MMU boxes, then the kernel+QEMU pair's matrix, dry-run the mails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
.venv/bin/invoke doctor  # every tool the stages run works, or the line naming its fix
exec .venv/bin/invoke pipeline "$@"

#!/usr/bin/env bash
# Create .venv and install torchtitan_like into it (editable). Safe to re-run: a no-op when nothing changed.
#   tools/setup.sh         the trainer
#   tools/setup.sh --dev   plus the test dependencies
# An installed torch in the supported range (e.g. a CUDA build, visible through --system-site-packages)
# is kept. Otherwise the CPU wheel torch==2.13.0 is installed: an unpinned torch would pull a CUDA
# build of several GB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras=""
case "$*" in
  "") ;;
  --dev) extras="[dev]" ;;
  *)
    echo "error: tools/setup.sh takes no arguments, or --dev (also the test dependencies); got: $*" >&2
    exit 2
    ;;
esac

if [[ ! -x .venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv --system-site-packages .venv
fi
py=.venv/bin/python
stamp=".venv/.torchtitan_like-setup${extras}"
want=$(cat pyproject.toml tools/setup.sh | cksum)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

if ! "$py" - <<'PY' 2>/dev/null
import sys, torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (2, 11) <= (major, minor) < (2, 14) else 1)
PY
then
  echo "setup: installing torch==2.13.0 (CPU wheel)"
  "$py" -m pip install -q --disable-pip-version-check torch==2.13.0
fi
echo "setup: installing torchtitan_like${extras} into .venv"
"$py" -m pip install -q --disable-pip-version-check -e ".${extras}"
echo "$want" > "$stamp"

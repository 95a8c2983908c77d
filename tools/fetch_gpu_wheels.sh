#!/usr/bin/env bash
# Wheels for the lent GPU machine (torch 2.11, Python 3.12, no internet), into .whl/ (kept out of git):
# the shared set (../shared/gpu/fetch_wheels.sh: torchao, torchdata, tomli; --peer adds torchtitan 0.2.2),
# which the machine lacks and which always go in, plus a fallback for two things its image is listed with
# (the device tool's KINDS.md, read 2026-11-17) but that a session cannot do without: tiktoken (with regex;
# the tokenizer module imports it) and pytest (benchmarks/gpu_session.py's gpu_tests step). The fallback
# goes in only where the import fails: a carried pytest would otherwise shadow the image's own, under
# which the image's pytest plugins load.
# --peer also fetches torchtitan 0.3.0 and its extra dependencies into .whl/peer030 (not on the install line:
# gpu_session's torchtitan_030 step installs them into /tmp/site030).
#   tools/fetch_gpu_wheels.sh [--peer]
# Then carry [".whl"] in the device call and start the command with the install line printed at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
../shared/gpu/fetch_wheels.sh "$@" >/dev/null
plat=()
for n in 17 24 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
fetch() {  # fetch DEST PACKAGE...
  local dest=$1
  shift
  rm -rf "$dest" && mkdir -p "$dest"
  for p in "$@"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${plat[@]}" --platform manylinux2014_x86_64 --platform any -d "$dest" "$p"
  done
}
rm -f .whl/tiktoken-*.whl .whl/regex-*.whl .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl \
  .whl/packaging-*.whl .whl/pygments-*.whl  # carried unconditionally by earlier versions of this script
if [[ " $* " == *" --peer "* ]]; then
  # torchtitan 0.3.0 and what it imports beyond 0.2.2's set, for benchmarks/torchtitan_030_probe.py (installed
  # into a target of its own, /tmp/site030, so that 0.2.2 stays the peer in /tmp/site).
  fetch .whl/peer030 "torchtitan==0.3.0" "spmd_types==0.2.3" torch_checkpointing einops
else
  rm -rf .whl/peer030
fi
fetch .whl/if_missing/tiktoken "tiktoken>=0.7" regex
fetch .whl/if_missing/pytest "pytest>=8" pluggy iniconfig packaging pygments
du -sh .whl
pip_target='python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site'
echo "In the device command, first:"
echo "$pip_target .whl/*.whl && export PYTHONPATH=/tmp/site:\$PYTHONPATH || exit;" \
  "for m in tiktoken pytest; do python3 -c \"import \$m\" 2>/dev/null || $pip_target .whl/if_missing/\$m/*.whl || exit; done;"

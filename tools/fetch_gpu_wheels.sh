#!/usr/bin/env bash
# Wheels for the lent GPU machine (torch 2.11, Python 3.12, no internet), into .whl/ (kept out of git):
# the shared set (../shared/gpu/fetch_wheels.sh: torchao, torchdata, tomli; --peer adds torchtitan 0.2.2),
# plus what our own code and the GPU tests import that the machine lacks: tiktoken (the tokenizer module
# imports it) with regex, and pytest with its dependencies (benchmarks/gpu_session.py's gpu_tests step).
#   tools/fetch_gpu_wheels.sh [--peer]
# Then carry [".whl"] in the device call and start the command with the install line printed at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
../shared/gpu/fetch_wheels.sh "$@" >/dev/null
plat=()
for n in 17 24 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
for p in "tiktoken>=0.7" regex pytest pluggy iniconfig packaging pygments; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" --platform manylinux2014_x86_64 --platform any -d .whl "$p" 2>/dev/null
done
du -sh .whl
echo "In the device command, first:"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:\$PYTHONPATH || exit;"

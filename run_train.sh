#!/usr/bin/env bash
# Launch training through torchrun.
#   NGPU        processes on this node (default: visible GPUs, else 1)
#   CONFIG_FILE TOML config (default: train_configs/debug_model.toml)
#   LOG_RANK    ranks whose output is shown, comma-separated (default: 0)
# Extra arguments are config overrides: --section.key value.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${NGPU:-}" ]]; then
  NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null || echo 1)
fi
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_model.toml}
LOG_RANK=${LOG_RANK:-0}

# One thread per rank unless the user says otherwise: CPU ranks otherwise oversubscribe the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# torchao's CUDA extensions cannot load on a CPU build; skip them instead of logging two failures.
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=${TORCHAO_FORCE_SKIP_LOADING_SO_FILES:-1}

exec "$PYTHON" -m torchtitan_like.launch \
  --nproc-per-node="$NGPU" \
  --rdzv-backend=c10d --rdzv-endpoint="localhost:0" \
  --local-ranks-filter="$LOG_RANK" --role=rank --tee=3 \
  -m torchtitan_like.train --job.config_file "$CONFIG_FILE" "$@"

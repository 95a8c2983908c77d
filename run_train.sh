#!/usr/bin/env bash
# Launch training through torchrun (c10d rendezvous), on one node or on each node of a multi-node job.
#   NGPU             processes on this node (default: visible GPUs, else 1)
#   CONFIG_FILE      TOML config (default: this checkout's train_configs/debug_model.toml)
#   LOG_RANK         local ranks whose output is shown, comma-separated (default: 0)
#   NNODES           nodes in the job (default: 1)
#   NODE_RANK        this node's index, 0..NNODES-1 (default: 0)
#   RDZV_ENDPOINT    host:port of the rendezvous, the same on every node (default: MASTER_ADDR:MASTER_PORT;
#                    on one node without MASTER_ADDR, localhost on MASTER_PORT, else on a free port). Without :port, torchrun's 29400; an
#                    IPv6 address in brackets ([::1]:29500). The host must resolve on this node (checked first)
#   MASTER_ADDR      rendezvous host when RDZV_ENDPOINT is unset; MASTER_PORT its port (default: 29500; on one
#                    node, MASTER_PORT without MASTER_ADDR is a port on localhost). With RDZV_ENDPOINT set, they
#                    do nothing, and are named in a warning where they differ from its host or port
#   RDZV_ID          job id, the same on every node (default: torchrun's "none"; tools/slurm_train.sbatch
#                    passes SLURM_JOB_ID)
#   MAX_RESTARTS     times torchrun restarts the workers after a failure, each time resuming from the latest
#                    complete checkpoint (default: 0)
#   SHUTDOWN_TIMEOUT seconds the workers get to checkpoint and exit after SIGTERM/SIGUSR1 before torchrun
#                    kills them (default: 60)
#   COMM_MODE        fake_backend: dry run. One process stands in for rank DRY_RUN_RANK (default 0) of a
#                    job of NGPU x NNODES ranks on a fake process group: every config check and model pass
#                    runs on the meta device, it reports the rank's parameter/gradient/optimizer bytes and
#                    exits without training (DRY_RUN_DEVICE: cuda (default) or cpu; DRY_RUN_JSON: write
#                    the report there; DRY_RUN_SKIP_FILES=1: do not check the tokenizer, dataset and
#                    initial checkpoint files, when this machine lacks them; 0, the default: check them;
#                    DRY_RUN_STEP_CHECK=1: then train the job's features and layout, shrunk to the debug model
#                    on at most DRY_RUN_STEP_CHECK_RANKS CPU processes (default 8), for 2 steps, saving and
#                    resuming where the job does: it catches what fails at the first step; 0, the default: skip;
#                    DRY_RUN_STEP_CHECK_TIMEOUT: seconds each of its launches may take, default 1200).
#                    Unset: a real run.
# Every variable is checked before anything starts: a bad value is one `error: VAR=value ...` line, exit 2.
# DRY_RUN_* variables that do nothing in this launch (no COMM_MODE; the step check's without DRY_RUN_STEP_CHECK=1)
# are named in one `run_train: warning: ...` line on stderr, and the launch goes on.
# Numbers are decimal (a leading zero is not octal: NGPU=08 is 8).
# Extra arguments are config overrides: --section.key value.
# Exit status: 0 done; 2 config or data error; 3 diverged; 75 pre-empted (SIGTERM/SIGUSR1: rerun to resume);
# 130 interrupted (SIGINT, Ctrl-C: nothing saved); 1 (or the worker's status) any other failure.
# Relative paths (CONFIG_FILE, DRY_RUN_JSON, and the config's own: job.dump_folder, model.tokenizer_path,
# dataset paths) are relative to the directory run_train.sh is started from, as for any command.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The package of this checkout, also where it is not installed into $PYTHON's environment.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# An interpreter that cannot run the trainer: one line that says so, not a shell or import error later. (find_spec
# does not import torch: this costs a bare interpreter start.)
if ! command -v "$PYTHON" > /dev/null 2>&1; then
  echo "error: PYTHON=$PYTHON is not an interpreter found here: point it at a Python with torch, or run" \
    "tools/setup.sh (it makes .venv, which this script uses)" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' > /dev/null 2>&1; then
  echo "error: PYTHON=$PYTHON cannot import torch: run tools/setup.sh (it makes .venv, which this script uses)," \
    "or point PYTHON at the interpreter of an environment with this project's requirements" >&2
  exit 2
fi
# need_int VAR MIN MAX WHAT: $VAR must be a decimal whole number in MIN..MAX (MAX empty: no upper bound), else
# one error line naming it and what it is (WHAT), and exit 2. Leading zeros are decimal (NGPU=08 is 8: bash
# arithmetic would read them as octal), and the variable is rewritten without them.
need_int() {
  local name=$1 min=$2 max=$3 what=$4 value=${!1}
  if [[ "$value" =~ ^[0-9]{1,9}$ ]] && (( 10#$value >= min )) && { [[ -z "$max" ]] || (( 10#$value <= max )); }; then
    printf -v "$name" '%d' "$((10#$value))"
    return 0
  fi
  local range=">= $min"
  if [[ -n "$max" ]]; then range="in $min..$max"; fi
  if [[ "$value" =~ ^[0-9]{10,}$ ]]; then range="$range of at most 9 digits"; fi
  echo "error: $name=$value must be a whole number $range: $what" >&2
  exit 2
}

# warn_unused "VAR..." WHY: one warning line naming those of the variables that are set, which do nothing in
# this launch (WHY says so). A warning rather than an error: they may be exported for every job.
warn_unused() {
  local name set_vars=()
  for name in $1; do
    if [[ -n "${!name:-}" ]]; then set_vars+=("$name=${!name}"); fi
  done
  local why=$2
  if ((${#set_vars[@]} == 1)); then why="does ${why#do }"; fi  # (WHY starts with "do": one variable "does")
  if ((${#set_vars[@]})); then echo "run_train: warning: ${set_vars[*]} $why" >&2; fi
}

# Every variable is checked here, before anything starts: a bad value is one error line and exit 2.
if [[ -z "${NGPU:-}" ]]; then
  NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null || echo 1)
fi
need_int NGPU 1 "" "the processes to start on this node (default: the visible GPUs, else 1), e.g. NGPU=8"
CONFIG_FILE=${CONFIG_FILE:-$ROOT/train_configs/debug_model.toml}
LOG_RANK=${LOG_RANK:-0}
NNODES=${NNODES:-1}
need_int NNODES 1 "" "the nodes in the job, each running run_train.sh (default 1)"
NODE_RANK=${NODE_RANK:-0}
need_int NODE_RANK 0 $((NNODES - 1)) "this node's index among NNODES=$NNODES node(s) (default 0)"
MAX_RESTARTS=${MAX_RESTARTS:-0}
need_int MAX_RESTARTS 0 "" "the times torchrun restarts the workers after a failure (default 0)"
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-60}
need_int SHUTDOWN_TIMEOUT 0 "" "the seconds the workers get to checkpoint and stop after SIGTERM/SIGUSR1 (default 60)"

if [[ ! "$LOG_RANK" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  echo "error: LOG_RANK=$LOG_RANK must be local rank numbers, comma-separated (e.g. 0 or 0,1)" >&2
  exit 2
fi
IFS=, read -ra log_ranks <<< "$LOG_RANK"
for r in "${log_ranks[@]}"; do
  # (A rank no process has would hide every line of output.)
  if [[ ${#r} -gt 9 ]] || (( 10#$r >= NGPU )); then
    echo "error: LOG_RANK=$LOG_RANK names local rank $r, but NGPU=$NGPU starts local ranks 0..$((NGPU - 1)) on" \
      "each node: name ranks in that range (e.g. LOG_RANK=0)" >&2
    exit 2
  fi
done

case "${COMM_MODE:-}" in
  "")
    warn_unused "DRY_RUN_RANK DRY_RUN_DEVICE DRY_RUN_JSON DRY_RUN_SKIP_FILES DRY_RUN_STEP_CHECK DRY_RUN_STEP_CHECK_RANKS
      DRY_RUN_STEP_CHECK_TIMEOUT" "do nothing without COMM_MODE=fake_backend: this is the real launch, not a dry run"
    ;;
  fake_backend)
    world=$((NGPU * NNODES))
    DRY_RUN_RANK=${DRY_RUN_RANK:-0}
    need_int DRY_RUN_RANK 0 $((world - 1)) "the rank of the NGPU x NNODES = $world ranks the dry run stands in for"
    extra=()
    if [[ -n "${DRY_RUN_JSON:-}" ]]; then extra=(--json "$DRY_RUN_JSON"); fi
    case "${DRY_RUN_SKIP_FILES:-0}" in
      0) ;;
      1) extra+=(--skip-files) ;;
      *)
        echo "error: DRY_RUN_SKIP_FILES=$DRY_RUN_SKIP_FILES must be 1 (skip the tokenizer, dataset and initial" \
          "checkpoint file checks) or 0 (check them, the default)" >&2
        exit 2
        ;;
    esac
    case "${DRY_RUN_STEP_CHECK:-0}" in
      0)
        warn_unused "DRY_RUN_STEP_CHECK_RANKS DRY_RUN_STEP_CHECK_TIMEOUT" \
          "do nothing without DRY_RUN_STEP_CHECK=1: no step check runs after this dry run"
        ;;
      1)
        DRY_RUN_STEP_CHECK_RANKS=${DRY_RUN_STEP_CHECK_RANKS:-8}
        need_int DRY_RUN_STEP_CHECK_RANKS 1 "" "the CPU processes the step check may start (default 8)"
        extra+=(--step-check --step-check-ranks "$DRY_RUN_STEP_CHECK_RANKS")
        if [[ -n "${DRY_RUN_STEP_CHECK_TIMEOUT:-}" ]]; then
          need_int DRY_RUN_STEP_CHECK_TIMEOUT 1 "" "the seconds each step-check launch may take (default 1200)"
          extra+=(--step-check-timeout "$DRY_RUN_STEP_CHECK_TIMEOUT")
        fi
        ;;
      *)
        echo "error: DRY_RUN_STEP_CHECK=$DRY_RUN_STEP_CHECK must be 1 (after the dry run, train the job's features" \
          "and layout shrunk on CPU processes) or 0 (do not, the default)" >&2
        exit 2
        ;;
    esac
    DRY_RUN_DEVICE=${DRY_RUN_DEVICE:-cuda}
    if [[ "$DRY_RUN_DEVICE" != cuda && "$DRY_RUN_DEVICE" != cpu ]]; then
      echo "error: DRY_RUN_DEVICE=$DRY_RUN_DEVICE is not a device type the dry run plans for: use cuda (the default)" \
        "or cpu" >&2
      exit 2
    fi
    export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=${TORCHAO_FORCE_SKIP_LOADING_SO_FILES:-1}
    exec "$PYTHON" -m torchtitan_like.dry_run --world-size "$world" --rank "$DRY_RUN_RANK" \
      --device "$DRY_RUN_DEVICE" ${extra[@]+"${extra[@]}"} --job.config_file "$CONFIG_FILE" "$@"
    ;;
  *)
    echo "error: COMM_MODE=$COMM_MODE is not a mode: use COMM_MODE=fake_backend for a dry run, or unset it" >&2
    exit 2
    ;;
esac
# Reached in a dry run only when the command above never ran: bash abandons a compound command whose expansion
# fails (even under set -e) and carries on with the next one, which must not be the real launch below.
if [[ "${COMM_MODE:-}" == fake_backend ]]; then
  echo "error: the dry run did not start (see the message above)" >&2
  exit 1
fi

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  # RDZV_ENDPOINT wins: a MASTER_ADDR or MASTER_PORT that names another host or port is named, not ignored unsaid.
  rdzv_host=${RDZV_ENDPOINT%:*} rdzv_port=${RDZV_ENDPOINT##*:}
  if [[ "$RDZV_ENDPOINT" != *:* || "$RDZV_ENDPOINT" == *"]" ]]; then rdzv_host=$RDZV_ENDPOINT rdzv_port=29400; fi
  ignored=()
  # (An IPv6 host is bracketed in the endpoint, [::1]:29500, and may be bare in MASTER_ADDR: compare them bare.)
  bare_rdzv=${rdzv_host#[} bare_master=${MASTER_ADDR:-}
  bare_rdzv=${bare_rdzv%]} bare_master=${bare_master#[} bare_master=${bare_master%]}
  if [[ -n "${MASTER_ADDR:-}" && "$bare_master" != "$bare_rdzv" ]]; then ignored+=(MASTER_ADDR); fi
  if [[ -n "${MASTER_PORT:-}" && "$MASTER_PORT" != "$rdzv_port" ]]; then ignored+=(MASTER_PORT); fi
  warn_unused "${ignored[*]-}" "do nothing when RDZV_ENDPOINT is set: the rendezvous is RDZV_ENDPOINT=$RDZV_ENDPOINT"
fi
if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
  if [[ -n "${MASTER_ADDR:-}" ]]; then
    MASTER_PORT=${MASTER_PORT:-29500}
    need_int MASTER_PORT 0 65535 "the rendezvous port on MASTER_ADDR=$MASTER_ADDR (default 29500)"
    RDZV_ENDPOINT="${MASTER_ADDR}:${MASTER_PORT}"
  elif [[ "$NNODES" == 1 && -n "${MASTER_PORT:-}" ]]; then
    # (MASTER_PORT alone on one node: its port on this machine, not a free one picked in its place.)
    need_int MASTER_PORT 0 65535 "the rendezvous port on this node (MASTER_ADDR unset: localhost)"
    RDZV_ENDPOINT="localhost:${MASTER_PORT}"
  elif [[ "$NNODES" == 1 ]]; then
    RDZV_ENDPOINT="localhost:0"  # port 0: the agent picks a free one
  else
    echo "error: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (or MASTER_ADDR and MASTER_PORT) naming a host" \
      "every node reaches, e.g. node 0" >&2
    exit 2
  fi
fi
rdzv_id=()
if [[ -n "${RDZV_ID:-}" ]]; then rdzv_id=(--rdzv-id="$RDZV_ID"); fi

# One thread per rank unless the user says otherwise: CPU ranks otherwise oversubscribe the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# torchao's CUDA extensions cannot load on a CPU build; skip them instead of logging two failures.
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=${TORCHAO_FORCE_SKIP_LOADING_SO_FILES:-1}

if [[ "$MAX_RESTARTS" != 0 ]]; then
  # torch 2.13's c10d rendezvous hands the workers the same store in every restart round, and a restarted
  # group then reads its peers' addresses from the previous round ("Connection refused" at init;
  # pytorch/pytorch#135712). Opting out of the shared store gives each round a fresh one.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi

# --signals-to-handle adds SIGUSR1 to torchrun's list (SIGTERM,SIGINT,SIGHUP,SIGQUIT): torchrun then forwards
# it to the workers, which treat it like SIGTERM (checkpoint and stop). Unlisted, it would kill torchrun.
exec "$PYTHON" -m torchtitan_like.launch \
  --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NGPU" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" ${rdzv_id[@]+"${rdzv_id[@]}"} \
  --max-restarts="$MAX_RESTARTS" \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
  --local-ranks-filter="$LOG_RANK" --role=rank --tee=3 \
  -m torchtitan_like.train --job.config_file "$CONFIG_FILE" "$@"

# Sourced by the example scripts.
#   resolve_ranks: sets WORLD (the ranks this launch starts), NNODES, NPROC_PER_NODE and
#     GPUS_PER_NODE, before anything loads: inside a SLURM allocation (sbatch/salloc) from SLURM_*;
#     otherwise this node, NPROC_PER_NODE processes (default: one per GPU, else 1). The scripts
#     size their defaults from WORLD (e.g. EMDR²'s indexer ranks: half of them).
#   launch MODULE ARGS...: refuses a topology that cannot work (check_topology, one line, exit 2),
#     then runs the python module on every rank: srun in SLURM (one task per GPU), else torchrun.
# GPUS_PER_NODE=N overrides the detected GPU count (e.g. to dry-run a GPU node's command elsewhere).
# --kill-on-bad-exit=0 lets the trainers finish if an indexer rank dies.
# EMDR2_DRY_RUN=1: print the python command (shell-quoted, one line) instead of running it; the
# topology is still checked and described on stderr.

resolve_ranks() {
  [[ -n "${_EMDR2_RANKS:-}" ]] && return 0
  if [[ -n "${SLURM_JOB_ID:-}" && -z "${EMDR2_NO_SLURM:-}" ]]; then
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local per_node=${SLURM_TASKS_PER_NODE:-1}   # e.g. "8(x2)" or "8,7": the first node's count
    per_node=${per_node%%[(,]*}
    NPROC_PER_NODE=${SLURM_NTASKS_PER_NODE:-$per_node}
    WORLD=${SLURM_NTASKS:-$(( NNODES * NPROC_PER_NODE ))}
    local gpus=${SLURM_GPUS_PER_NODE:-0}       # e.g. "8" or "a100:8"
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${gpus##*:}}}
  else
    NNODES=1
    GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}
    NPROC_PER_NODE=${NPROC_PER_NODE:-$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))}
    WORLD=$NPROC_PER_NODE
  fi
  _EMDR2_RANKS=1
}

# The value python will see for FLAG among ARGS: its last occurrence (argparse's rule), else DEFAULT.
flag_value() {
  local flag=$1 value=$2
  shift 2
  while (( $# )); do
    case $1 in
      "$flag") value=${2-}; shift ;;
      "$flag"=*) value=${1#*=} ;;
    esac
    shift
  done
  printf '%s\n' "$value"
}

# The checks the python entry points make after loading (and some they cannot: GPUs shared by two
# ranks), made before anything loads. ARGS: the python module's flags.
check_topology() {
  local indexers tp gb mb where trainers dp
  indexers=$(flag_value --num-indexer-ranks 0 "$@")
  tp=$(flag_value --tensor-model-parallel-size 1 "$@")
  gb=$(flag_value --global-batch-size "" "$@")
  mb=$(flag_value --micro-batch-size 1 "$@")
  where="$WORLD ranks launched = $NNODES node(s) x NPROC_PER_NODE=$NPROC_PER_NODE, $GPUS_PER_NODE GPUs per node"
  for v in "$indexers" "$tp" "$mb" "${gb:-0}"; do
    [[ $v =~ ^-?[0-9]+$ ]] || return 0  # not a number: python's own check says so
  done
  if (( GPUS_PER_NODE > 0 && NPROC_PER_NODE > GPUS_PER_NODE )); then
    echo "launch: error: $NPROC_PER_NODE processes per node would share its $GPUS_PER_NODE GPUs ($where);" \
         "launch one per GPU (NPROC_PER_NODE=$GPUS_PER_NODE) and add nodes for more ranks" >&2
    return 2
  fi
  if (( indexers < 0 || indexers >= WORLD )); then
    echo "launch: error: --num-indexer-ranks $indexers leaves no rank to train ($where);" \
         "set INDEXERS below $WORLD (default: half of the ranks)" >&2
    return 2
  fi
  trainers=$(( WORLD - indexers ))
  if (( tp < 1 || trainers % tp != 0 )); then
    echo "launch: error: --tensor-model-parallel-size $tp does not divide the $trainers training ranks" \
         "($where, $indexers indexing)" >&2
    return 2
  fi
  dp=$(( trainers / tp ))
  if [[ -n $gb ]] && (( mb < 1 || gb % (mb * dp) != 0 )); then
    echo "launch: error: --global-batch-size $gb is not a multiple of --micro-batch-size $mb x $dp data-parallel" \
         "ranks ($where, $indexers indexing, tensor parallel $tp)" >&2
    return 2
  fi
  echo "launch: $where: $trainers train (tensor parallel $tp), $indexers index the evidence" >&2
}

launch() {
  local module="$1"; shift
  resolve_ranks
  check_topology "$@" || exit 2
  if [[ -n "${EMDR2_DRY_RUN:-}" ]]; then
    printf '%q ' python -m "$module" "$@"; echo
    return 0
  fi
  if [[ -n "${SLURM_JOB_ID:-}" && -z "${EMDR2_NO_SLURM:-}" ]]; then
    export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
    export MASTER_PORT="${MASTER_PORT:-29500}"
    srun --kill-on-bad-exit=0 python -m "$module" "$@"
  else
    torchrun --nproc_per_node "$NPROC_PER_NODE" --master_port "${MASTER_PORT:-29500}" -m "$module" "$@"
  fi
}

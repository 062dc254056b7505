# Sourced by the example scripts: `launch MODULE ARGS...` runs a python module on every rank.
#   inside a SLURM allocation (sbatch/salloc): srun, one task per GPU; ranks come from SLURM_*
#   otherwise: torchrun on this node with NPROC_PER_NODE processes (default: one per GPU, else 1)
# --kill-on-bad-exit=0 lets the trainers finish if an indexer rank dies.
# EMDR2_DRY_RUN=1: print the python command (shell-quoted, one line) instead of running it.

launch() {
  local module="$1"; shift
  if [[ -n "${EMDR2_DRY_RUN:-}" ]]; then
    printf '%q ' python -m "$module" "$@"; echo
    return 0
  fi
  if [[ -n "${SLURM_JOB_ID:-}" && -z "${EMDR2_NO_SLURM:-}" ]]; then
    export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
    export MASTER_PORT="${MASTER_PORT:-29500}"
    srun --kill-on-bad-exit=0 python -m "$module" "$@"
  else
    local gpus
    gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    local nproc="${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"
    torchrun --nproc_per_node "$nproc" --master_port "${MASTER_PORT:-29500}" -m "$module" "$@"
  fi
}

#!/bin/bash
# One node's torchrun under Slurm: train.sbatch starts it once per node with srun. Every node meets the others
# at the allocation's first node (c10d rendezvous, the job id as its id); torchrun starts one worker per GPU,
# restarts all of them (up to MAX_RESTARTS times) when one fails or hangs, and passes SIGUSR1 (Slurm's warning
# before the time limit) on to them, like SIGTERM: they write a checkpoint and exit.
#
# From the allocation: SLURM_JOB_ID, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST, SLURM_GPUS_ON_NODE.
# Settings: RDZV_HOST (the first host of SLURM_JOB_NODELIST), RDZV_PORT (29500), NPROC_PER_NODE (the GPUs
# of this node), MAX_RESTARTS (3), PYTHON (python). Arguments: train.py's (config files, --key=value flags).
set -euo pipefail
cd "$(dirname "$0")/../.."
host=${RDZV_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
is_host=$([ "$SLURM_NODEID" = 0 ] && echo true || echo false)  # the first node serves the rendezvous
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc_per_node="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$host:${RDZV_PORT:-29500}" \
    --rdzv_conf=is_host="$is_host" --max-restarts="${MAX_RESTARTS:-3}" \
    --signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    train.py "$@"

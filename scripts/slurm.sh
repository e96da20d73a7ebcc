#!/usr/bin/env bash
# A SLURM job for train.py or finetune.py that survives preemption and time limits
# (docs/CLUSTER.md). Edit the header, then submit from the folder the paths are relative to:
#
#   bash scripts/slurm.sh                         # the header's program and arguments
#   bash scripts/slurm.sh finetune.py --task vqa --data data/vqa-rad --init runs/base/checkpoint.safetensors
#
# Run with bash, it creates the log folder OUT/slurm (SLURM does not: a missing one fails the job)
# and submits itself with sbatch; as the job, it runs one torchrun per node and, when the run
# stopped before its end with progress saved (the time-limit notice), queues the job again.
# Every header value may also come from the environment (NODES=1 GPUS=0 bash scripts/slurm.sh).
set -euo pipefail

# ----------------------------------------------------------------------------- header
NODES=${NODES:-2}
PROCS_PER_NODE=${PROCS_PER_NODE:-8}  # training processes per node (torchrun --nproc_per_node)
GPUS=${GPUS:-1}                     # 1: one GPU per process (NCCL); 0: the CPU (gloo)
CPUS_PER_NODE=${CPUS_PER_NODE:-64}
TIME=${TIME:-24:00:00}              # the time limit (SLURM counts whole minutes)
NOTICE=${NOTICE:-300}               # SIGTERM to the job step this many seconds before the limit
MAX_RESTARTS=${MAX_RESTARTS:-3}     # torchrun relaunches of the workers after a worker died
OUT=${OUT:-runs/base}               # the run folder, on a filesystem every node sees
PYTHON=${PYTHON:-python}
PORT=${PORT:-29500}                 # the rendezvous port on the first node
if [ $# -eq 0 ]; then               # the program and its arguments (without --out and --resume)
    set -- train.py --preset base --data data/mimic-cxr \
        --vision-init weights/clip-vit-base-patch16 --text-init weights/roberta-base
fi

# ----------------------------------------------------------------------------- submission
if [ -z "${SLURM_JOB_ID:-}" ]; then
    mkdir -p "$OUT/slurm"
    gpus=()
    [ "$GPUS" -gt 0 ] && gpus=(--gpus-per-node="$((GPUS * PROCS_PER_NODE))")
    export PTUNIFIER_ROOT; PTUNIFIER_ROOT=$(cd "$(dirname "$0")/.." && pwd)
    export NODES PROCS_PER_NODE GPUS CPUS_PER_NODE TIME NOTICE MAX_RESTARTS OUT PYTHON PORT
    # One task per node: its torchrun starts the node's processes. --requeue: a preempted job goes
    # back to the queue; --signal: SIGTERM to the step (not this shell) NOTICE s before the limit;
    # --open-mode=append: every launch of the job appends to one log.
    exec sbatch --job-name="ptunifier-$(basename "$OUT")" --nodes="$NODES" --ntasks-per-node=1 \
        --cpus-per-task="$CPUS_PER_NODE" "${gpus[@]}" --time="$TIME" --requeue \
        --signal="TERM@$NOTICE" --open-mode=append --output="$OUT/slurm/%j.out" "$0" "$@"
fi

# ----------------------------------------------------------------------------- the job
: "${PTUNIFIER_ROOT:?submit with bash scripts/slurm.sh: it creates the log folder and sets the job options}"
cd "$SLURM_SUBMIT_DIR"
program=$PTUNIFIER_ROOT/$1; shift
done=result.json; [ "$(basename "$program")" = finetune.py ] && done=results.json
saved_step() {  # the step of OUT/checkpoint.safetensors, or "none"
    "$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path
from checkpoint import read_metadata
p = Path(sys.argv[2]) / "checkpoint.safetensors"
print(read_metadata(p)["state"]["step"] if p.is_file() else "none")' "$PTUNIFIER_ROOT" "$OUT"
}
before=$(saved_step)
echo "launch $(( ${SLURM_RESTART_COUNT:-0} + 1 )) of job $SLURM_JOB_ID on $SLURM_JOB_NODELIST at $(date -u +%FT%TZ), checkpoint at step $before"
HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
status=0
srun "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc_per_node="$PROCS_PER_NODE" \
    --max-restarts="$MAX_RESTARTS" --rdzv_backend=c10d --rdzv_endpoint="$HOST:$PORT" \
    --rdzv_id="$SLURM_JOB_ID" "$program" "$@" --out "$OUT" --resume auto || status=$?
after=$(saved_step)
if [ -f "$OUT/$done" ]; then
    echo "finished: $OUT/$done"
elif [ "$after" != "$before" ]; then  # stopped by the notice, progress saved: the job goes on later
    echo "stopped at step $after (torchrun exit $status): requeued at $(date -u +%FT%TZ)"
    scontrol requeue "$SLURM_JOB_ID"
else  # a run that fails before it saves anything is not queued forever
    echo "stopped without progress (step $after, torchrun exit $status): not requeued" >&2
    exit 1
fi

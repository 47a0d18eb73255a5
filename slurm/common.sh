# Sourced by the toolkit's batch scripts: launch a recipe as one Slurm task per process,
# pass preemption signals to every rank, requeue a stopped run, never a finished or bad one.
#
# Why srun tasks and not torchrun per node: each worker's own exit code reaches the batch
# script (torchrun reports a worker's 75, "stopped, resume me", as its own failure, 1), and a
# signal reaches the workers themselves (SIGUSR1 sent to torchrun kills the agent while its
# workers train on). Exit codes (toolkit/recipe.py): 0 finished, 2 bad input, 75 stopped with
# a checkpoint saved; anything else is a crash.

toolkit_master_addr() {
    # The first node's address as Slurm knows it (NodeAddr): a resolvable name or an IP.
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    scontrol show node "$first" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p'
}

toolkit_forward() {
    # Slurm signals the batch shell alone (--signal=B:USR1@T, scancel --batch); every step's
    # tasks, on every node, get it from here. The workers checkpoint at the next step
    # boundary (they agree on it collectively) and exit 75.
    echo "toolkit: job $SLURM_JOB_ID got SIG$1: every rank checkpoints at its next step"
    scancel --signal="$1" "$SLURM_JOB_ID"
}

# toolkit_run OUTPUT_DIR RECIPE [ARGS...]: train (resuming from the newest complete
# checkpoint in OUTPUT_DIR, if any), then requeue the job if the run was stopped.
toolkit_run() {
    local out=$1 recipe=$2
    shift 2
    local attempt=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))
    export MASTER_ADDR=${MASTER_ADDR:-$(toolkit_master_addr)}
    export MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID%%_*} % 20000 ))}
    echo "toolkit: job $SLURM_JOB_ID attempt $attempt: $SLURM_NTASKS process(es) on" \
         "$SLURM_JOB_NODELIST (master $MASTER_ADDR:$MASTER_PORT), $recipe -> $out"
    trap 'toolkit_forward USR1' USR1
    trap 'toolkit_forward TERM' TERM
    # One task per process; RANK and friends from Slurm's task ids. --wait: once one task has
    # ended, the others get TASK_WAIT seconds (a rank of a silent node never ends by itself).
    srun --ntasks="$SLURM_NTASKS" --wait="${TASK_WAIT:-120}" --export=ALL bash -c \
        'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
         exec "$@"' toolkit-worker "${PYTHON:-python3}" "$recipe" \
        --output-dir "$out" --resume auto "$@" &
    local step=$!
    # A trapped signal interrupts `wait`; wait again until srun has really ended.
    while wait "$step"; code=$?; kill -0 "$step" 2>/dev/null; do :; done
    wait "$step" 2>/dev/null; code=$?
    trap - USR1 TERM
    case $code in
        0)  echo "toolkit: finished: $out/results.json" ;;
        75) echo "toolkit: stopped with a checkpoint in $out: requeueing job $SLURM_JOB_ID"
            scontrol requeue "$SLURM_JOB_ID" ;;
        2)  echo "toolkit: bad input (the error line is above): not requeued" ;;
        *)  echo "toolkit: failed with exit code $code: not requeued; resubmit to resume" \
                 "from the newest complete checkpoint in $out" ;;
    esac
    return "$code"
}

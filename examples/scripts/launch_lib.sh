# Sourced by the GPU launch scripts: one interpreter for the dry run and the launch, and the
# torchrun rendezvous, from SLURM's environment inside an allocation (the sbatch scripts' srun).
#
# prores_python: PYTHON if set, else the project environment if it exists, else python3 on PATH (in a
# container, the container's). Never builds an environment: a login node stays light.
prores_python() {
    local venv="$HOME/.cache/prores-megatron/venv-py3.12-torch2.11.0-mcore0.19.2/bin/python"
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -x "$venv" ]]; then PYTHON="$venv"; else PYTHON=python3; fi
    fi
}

# prores_rendezvous NAME DEFAULT_NODES: sets NNODES, NODE_RANK, GPUS_PER_NODE, MASTER_ADDR,
# MASTER_PORT and OUTER_LAUNCHER. Inside a SLURM job step (SLURM_JOB_ID and SLURM_NNODES set, one
# task per node): the node count, this node's rank, the first node of SLURM_JOB_NODELIST and a port
# from the job id, unless the variables are set already. Refuses (status 2, naming MASTER_ADDR) a
# multi-node rendezvous on localhost or on nothing: every node but the first would hang.
prores_rendezvous() {
    local name=$1 default_nodes=$2
    OUTER_LAUNCHER=""
    if [[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_NNODES:-}" ]]; then
        NNODES=${NNODES:-$SLURM_NNODES}
        NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
        if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
            local hosts  # all of them, then the first: `| head -1` would SIGPIPE scontrol under pipefail
            hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
            MASTER_ADDR=${hosts%%$'\n'*}
        fi
        MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
        OUTER_LAUNCHER="srun (SLURM job $SLURM_JOB_ID, $SLURM_NNODES nodes, one task per node)"
    fi
    NNODES=${NNODES:-$default_nodes}
    NODE_RANK=${NODE_RANK:-0}
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
    MASTER_PORT=${MASTER_PORT:-6000}
    if (( NNODES > 1 )); then
        case "${MASTER_ADDR:-}" in
            ""|localhost|127.0.0.1|::1|0.0.0.0)
                echo "$name: MASTER_ADDR=${MASTER_ADDR:-(unset)} with NNODES=$NNODES: every node but the first" \
                     "would wait for a rendezvous on itself and hang. Set MASTER_ADDR to the first node's" \
                     "hostname (the sbatch scripts take it from SLURM_JOB_NODELIST), or NNODES=1." >&2
                return 2 ;;
        esac
    else
        MASTER_ADDR=${MASTER_ADDR:-localhost}
    fi
}

# prores_exit_duration MARGIN: inside a SLURM job, export EXIT_DURATION_MINS (unless set) as the
# job's time left (squeue's %L: [D-]HH:MM:SS, MM:SS, UNLIMITED) minus MARGIN minutes, so Megatron's
# --exit-duration-in-mins saves a checkpoint and exits before SLURM kills the job. Nothing when the
# time is unlimited, unknown, or shorter than twice the margin.
prores_exit_duration() {
    local margin=$1 left days=0 h=0 m=0 s=0 minutes
    [[ -z "${EXIT_DURATION_MINS:-}" && -n "${SLURM_JOB_ID:-}" ]] || return 0
    command -v squeue >/dev/null || return 0
    left=$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null || true)
    [[ "$left" =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]] || return 0
    days=${BASH_REMATCH[2]:-0}; h=${BASH_REMATCH[4]:-0}; m=${BASH_REMATCH[5]}; s=${BASH_REMATCH[6]}
    minutes=$(( 10#$days * 1440 + 10#$h * 60 + 10#$m ))
    (( minutes >= 2 * margin )) || return 0
    export EXIT_DURATION_MINS=$(( minutes - margin ))
}

# prores_sbatch_run NAME SCRIPT: the body of the sbatch scripts. Needs CONTAINER_IMAGE; runs
# `bash examples/scripts/SCRIPT` on every node through one srun task per node inside the container
# (pyxis/enroot), the repository mounted at its own path (+ CONTAINER_MOUNTS, SRUN_ARGS), every line
# of the job's single log labelled with its task. Never returns.
prores_sbatch_run() {
    local name=$1 script=$2 mounts extra
    if [[ -z "${CONTAINER_IMAGE:-}" ]]; then
        echo "$name: set CONTAINER_IMAGE (an image with torch, Transformer Engine and" \
             "prores-megatron; docs/usage.md, Containers)" >&2
        exit 2
    fi
    prores_exit_duration 15
    mounts="$ROOT:$ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
    read -r -a extra <<< "${SRUN_ARGS:-}"
    echo "job ${SLURM_JOB_ID:-?}: ${SLURM_NNODES:-?} nodes (${SLURM_JOB_NODELIST:-?}), image $CONTAINER_IMAGE," \
         "exit after ${EXIT_DURATION_MINS:-unlimited} min"
    exec srun --ntasks-per-node=1 --label --kill-on-bad-exit=1 \
        --container-image="$CONTAINER_IMAGE" --container-mounts="$mounts" --container-workdir="$ROOT" \
        --no-container-mount-home "${extra[@]}" \
        bash "$ROOT/examples/scripts/$script"
}

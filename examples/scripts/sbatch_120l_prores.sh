#!/usr/bin/env bash
#SBATCH --job-name=prores-120l
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.log
# SLURM job for the 120-layer ProRes model (pretrain_120l_prores.sh): one srun task per node, each
# running the torchrun script inside the container; the rendezvous comes from SLURM's environment
# (first node of SLURM_JOB_NODELIST, SLURM_NODEID, SLURM_NNODES: launch_lib.sh), and the whole job
# writes one log, %x-%j.log in the submission directory (every line prefixed with its task by --label).
#
#   CONTAINER_IMAGE=nvcr.io/nvidia/pytorch:<tag> sbatch examples/scripts/sbatch_120l_prores.sh
#
# Environment (sbatch passes the caller's environment through; every variable of
# pretrain_120l_prores.sh applies):
#   CONTAINER_IMAGE   (required) image or .sqsh with torch, Transformer Engine and this package
#                     installed (docs/usage.md, "Containers"); run with pyxis/enroot (--container-image)
#   CONTAINER_MOUNTS  extra mounts, "src:dst[,src:dst]" (the repository is always mounted at its own path)
#   PRORES_ROOT       the repository (default: the submission directory, SLURM_SUBMIT_DIR)
#   SRUN_ARGS         more srun flags
#   EXIT_DURATION_MINS  default: the job's time left (squeue) minus 15 minutes, so Megatron saves and
#                     exits before the time limit (--exit-duration-in-mins); scancel and preemption
#                     send SIGTERM, which --exit-signal-handler turns into a save too
set -euo pipefail
ROOT=${PRORES_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
if [[ ! -f "$ROOT/examples/scripts/launch_lib.sh" ]]; then
    echo "sbatch_120l_prores.sh: $ROOT is not the prores-megatron repository; submit from it or set PRORES_ROOT" >&2
    exit 2
fi
source "$ROOT/examples/scripts/launch_lib.sh"
prores_sbatch_run sbatch_120l_prores.sh pretrain_120l_prores.sh

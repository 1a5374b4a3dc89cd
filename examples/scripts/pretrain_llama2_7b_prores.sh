#!/usr/bin/env bash
# Llama-2-7B-shaped pretraining with ProRes on H100s: Transformer Engine, FP8 (hybrid, current
# scaling by default: FP8_RECIPE) with bf16, TP 1 (the dry run's memory estimate, 57 GiB per GPU,
# fits an 80 GB H100 without recompute: examples/scripts/README.md), distributed optimizer with
# overlapped grad reduce-scatter / param all-gather, NVIDIA's H100 FP8 performance flags
# (flag_groups.sh), torch_dist checkpoints with time-limit and signal saves, TensorBoard and the
# ProRes depth monitor. Run it on every node (one torchrun per node); under SLURM submit
# sbatch_llama2_7b_prores.sh, which runs it through srun in a container. Defaults: 8 nodes x 8 GPUs.
#
#   DRY_RUN=1 MOCK=1 MASTER_ADDR=node001 bash examples/scripts/pretrain_llama2_7b_prores.sh
# checks everything without a GPU: Megatron-LM's and ProRes's argument validation for this world
# size, the layer -> pipeline stage table, the alpha plan, the parameter count, the memory estimate,
# the versions and the exact launch command (DRY_RUN_ARGS=--json for machine output).
#
# Environment (positional arguments 1-4 override the paths, Megatron-LM example style):
#   NNODES, NODE_RANK, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT   torchrun rendezvous (8, 0, 8, -, 6000);
#                               inside a SLURM job (sbatch_*.sh): from SLURM_NNODES, SLURM_NODEID and
#                               SLURM_JOB_NODELIST. MASTER_ADDR is required with more than one node
#   RUN_DIR                     checkpoints, TensorBoard, data cache, profiles (required to launch)
#   CHECKPOINT_PATH ($1)        --save/--load directory (default $RUN_DIR/checkpoints)
#   TENSORBOARD_LOGS_PATH ($2)  TensorBoard directory (default $RUN_DIR/tensorboard)
#   TOKENIZER_MODEL ($3)        Llama-2 SentencePiece tokenizer.model
#   DATA_PATH ($4)              indexed-dataset prefix(es) (PREFIX.bin/.idx), e.g. "0.7 A_text_document 0.3 B_text_document"
#   MOCK=1                      synthetic data and NullTokenizer (no data or tokenizer needed)
#   TP (1), PP (1)              tensor / pipeline parallel sizes (TP > 1 adds sequence parallel + TP overlap)
#   MICRO_BATCH_SIZE (1), GLOBAL_BATCH_SIZE (1024), TRAIN_ITERS (100000)
#   PRORES_SCHEDULE (linear), PRORES_WARMUP_STEPS (1000: layer l reaches alpha = 1 at step 1000*l).
#                   T matches the paper's steps, not its tokens: a step here is 1024 x 4096 tokens, 8x
#                   the paper's 512 x 1024, so T = 1000 is 4.19 B tokens per layer, 8x the paper's 0.52 B
#                   (the dry run prints it); PRORES_WARMUP_STEPS=125 would match the paper's tokens.
#   FP8_RECIPE (tensorwise)     tensorwise (current scaling), delayed, or none (bf16 only)
#   flag_groups.sh: SAVE_INTERVAL, EXIT_DURATION_MINS, ASYNC_SAVE, NON_PERSISTENT_SAVE_INTERVAL,
#                   PRORES_MONITOR_INTERVAL, WANDB_PROJECT, PROFILE, RECOMPUTE, NUM_WORKERS, ...
#   EXTRA_ARGS                  more Megatron-LM / ProRes flags, appended last (they win)
#   PYTHON                      the interpreter of the dry run and of the launch (python -m
#                               torch.distributed.run): default the project environment if present, else python3
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NAME=pretrain_llama2_7b_prores.sh
source "$ROOT/examples/scripts/launch_lib.sh"
source "$ROOT/examples/scripts/flag_groups.sh"
prores_python
prores_rendezvous "$NAME" 8
prores_paths "$NAME" "$@"
DRY_RUN=${DRY_RUN:-0}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-1024}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
PRORES_SCHEDULE=${PRORES_SCHEDULE:-linear}
PRORES_WARMUP_STEPS=${PRORES_WARMUP_STEPS:-1000}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

prores_llama_args 4096 11008 32 4096
MODEL_ARGS=(--num-layers 32 "${MODEL_ARGS[@]}")
TRAINING_ARGS=(
    --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
    --train-iters "$TRAIN_ITERS"
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
prores_shared_groups "$NAME" "$TP"
PRORES_ARGS=(--prores-schedule "$PRORES_SCHEDULE" --prores-warmup-steps "$PRORES_WARMUP_STEPS")
ALL_ARGS=(
    "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${SHARED_ARGS[@]}"
    "${PRORES_ARGS[@]}" "${EXTRA[@]}"
)
prores_launch "$NAME"

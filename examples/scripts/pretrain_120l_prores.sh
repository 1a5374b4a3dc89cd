#!/usr/bin/env bash
# A 120-layer, ~6.3 B-parameter Llama-style model (hidden 2048, 16 heads, FFN 5632, seq 4096) with
# ProRes at T = 500 (the paper's choice at >= 96 layers: layer l reaches alpha = 1 at step 500*l).
# Defaults: 8 nodes x 8 H100s = TP 2 (inside a node, with sequence parallel and TP overlap) x PP 8
# (one stage per node) x DP 4, three virtual stages per pipeline rank through an explicit
# --pipeline-model-parallel-layout that gives the embedding and loss chunks fewer layers, FP8 (TE
# current scaling by default: FP8_RECIPE) with bf16, NVIDIA's H100 FP8 performance flags
# (flag_groups.sh), torch_dist checkpoints with time-limit and signal saves, TensorBoard and the
# ProRes depth monitor. Why this split, and where the 120-layer shape meets Megatron-LM's limits:
# examples/scripts/README.md. Under SLURM submit sbatch_120l_prores.sh.
#
#   DRY_RUN=1 MOCK=1 MASTER_ADDR=node001 bash examples/scripts/pretrain_120l_prores.sh
# checks it without a GPU (Megatron-LM + ProRes validation for this world size, layer -> stage and
# chunk table covering 1..120, alpha plan, parameter count, memory estimate, versions, launch
# command; DRY_RUN_ARGS=--json).
#
# Environment (positional arguments 1-4 override the paths, Megatron-LM example style):
#   NNODES, NODE_RANK, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT   torchrun rendezvous (8, 0, 8, -, 6000);
#                          inside a SLURM job (sbatch_*.sh): from SLURM_NNODES, SLURM_NODEID and
#                          SLURM_JOB_NODELIST. MASTER_ADDR is required with more than one node
#   RUN_DIR                checkpoints, TensorBoard, data cache, profiles (required to launch)
#   CHECKPOINT_PATH ($1), TENSORBOARD_LOGS_PATH ($2)   default $RUN_DIR/{checkpoints,tensorboard}
#   TOKENIZER_MODEL ($3)   SentencePiece tokenizer.model (Llama-2's 32000 tokens assumed by the dry run)
#   DATA_PATH ($4)         indexed-dataset prefix(es) (PREFIX.bin/.idx)       MOCK=1: synthetic data
#   TP (2), PP (8)         tensor / pipeline parallel sizes
#   PP_LAYOUT              --pipeline-model-parallel-layout (default: the balanced PP=8 layout below;
#                          set it empty to split evenly, with VPP virtual stages per rank if given)
#   VPP                    --num-virtual-stages-per-pipeline-rank when PP_LAYOUT is empty
#   MICRO_BATCH_SIZE (1), GLOBAL_BATCH_SIZE (512), TRAIN_ITERS (150000)
#   PRORES_SCHEDULE (linear), PRORES_WARMUP_STEPS (500). T matches the paper's steps (500 at >= 96
#                   layers), not its tokens: a step here is 512 x 4096 tokens, 4x the paper's 512 x 1024,
#                   so T = 500 is 1.05 B tokens per layer, 2x the paper's 1000-step reference (0.52 B;
#                   the dry run prints it). PRORES_WARMUP_STEPS=125 would match the paper's 500-step tokens.
#   FP8_RECIPE (tensorwise) tensorwise (current scaling), delayed, or none (bf16 only)
#   flag_groups.sh: SAVE_INTERVAL, EXIT_DURATION_MINS, ASYNC_SAVE, NON_PERSISTENT_SAVE_INTERVAL,
#                   PRORES_MONITOR_INTERVAL, WANDB_PROJECT, PROFILE, RECOMPUTE, NUM_WORKERS, ...
#   EXTRA_ARGS             more flags, appended last
#   PYTHON                 the interpreter of the dry run and of the launch (python -m torch.distributed.run):
#                          default the project environment if present, else python3
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NAME=pretrain_120l_prores.sh
source "$ROOT/examples/scripts/launch_lib.sh"
source "$ROOT/examples/scripts/flag_groups.sh"
prores_python
prores_rendezvous "$NAME" 8
prores_paths "$NAME" "$@"
DRY_RUN=${DRY_RUN:-0}
TP=${TP:-2}
PP=${PP:-8}
# 24 chunks (8 ranks x 3 virtual stages), listed virtual stage by virtual stage, rank 0 first. The
# loss chunk (last rank, last stage: final norm + bf16 LM head + cross-entropy, about two layers of
# FP8 work) and the embedding chunk (rank 0, which also holds the most in-flight micro-batches) get
# 4 layers; two middle chunks (ranks 3 and 4, stage 1) take the 2 left over. Per rank: 14, 15, 15,
# 16, 16, 15, 15, 14 layers.
BALANCED_LAYOUT_PP8="Et*4|(t*5|)*10,t*6|t*6|(t*5|)*10,t*4L"
if [[ -z "${PP_LAYOUT+set}" ]]; then
    PP_LAYOUT=$([[ "$PP" == 8 ]] && echo "$BALANCED_LAYOUT_PP8" || true)
fi
VPP=${VPP:-}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-512}
TRAIN_ITERS=${TRAIN_ITERS:-150000}
PRORES_SCHEDULE=${PRORES_SCHEDULE:-linear}
PRORES_WARMUP_STEPS=${PRORES_WARMUP_STEPS:-500}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

prores_llama_args 2048 5632 16 4096
MODEL_ARGS=(--num-layers 120 "${MODEL_ARGS[@]}")
TRAINING_ARGS=(
    --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
    --train-iters "$TRAIN_ITERS"
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
if [[ -n "$PP_LAYOUT" ]]; then
    MODEL_PARALLEL_ARGS+=(--pipeline-model-parallel-layout "$PP_LAYOUT")
fi
if [[ -n "$VPP" ]]; then  # with PP_LAYOUT too, the dry run / Megatron refuses the pair by name
    MODEL_PARALLEL_ARGS+=(--num-virtual-stages-per-pipeline-rank "$VPP")
fi
prores_shared_groups "$NAME" "$TP"
PRORES_ARGS=(--prores-schedule "$PRORES_SCHEDULE" --prores-warmup-steps "$PRORES_WARMUP_STEPS")
ALL_ARGS=(
    "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${SHARED_ARGS[@]}"
    "${PRORES_ARGS[@]}" "${EXTRA[@]}"
)
prores_launch "$NAME"

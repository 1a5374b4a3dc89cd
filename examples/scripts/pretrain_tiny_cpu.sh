#!/usr/bin/env bash
# A tiny Llama-style ProRes pretraining run on CPU (gloo) through Megatron-LM's real training loop.
# Same entry point and flags as the GPU scripts, shrunk to run in about a minute on 2 cores.
#   TP, PP, DP      tensor / pipeline / data parallel sizes (world size = TP*PP*DP, default 1*2*1)
#   TRAIN_ITERS     total optimizer steps (default 20)      EXIT_INTERVAL  stop early (resume test)
#   TRAIN_SAMPLES   train by samples instead (--train-samples, --lr-warmup-samples 16)
#   BATCH_SCHEDULE  a batch-size ramp-up, --step-batch-size-schedule "TOKENS:BATCH ..." (megatron-core
#                   0.19 ignores the deprecated --rampup-batch-size), instead of --global-batch-size 8
#   SAVE_DIR        checkpoint directory (default runs/tiny_cpu/ckpt; resumes when it has one)
#   PRORES_ARGS     ProRes flags (default: linear, T = 2 steps per layer; set but empty: ProRes off, stock)
#   EXTRA_ARGS      anything else, appended last (it wins)
#   PYTHON          interpreter (default: the project environment, built on first use)
#   DRY_RUN=1       validate and print the layout, alpha plan, parameter count and command instead
#                   (python -m prores_megatron.training.dry_run; DRY_RUN_ARGS=--json for machine output)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    source "$ROOT/tools/setup_env.sh"
    PYTHON="$PRORES_PY"
fi
TP=${TP:-1}
PP=${PP:-2}
DP=${DP:-1}
TRAIN_ITERS=${TRAIN_ITERS:-20}
SAVE_DIR=${SAVE_DIR:-$ROOT/runs/tiny_cpu/ckpt}
MASTER_PORT=${MASTER_PORT:-$((20000 + RANDOM % 20000))}
WORLD=$((TP * PP * DP))
read -r -a PRORES_ARGS <<< "${PRORES_ARGS---prores-schedule linear --prores-warmup-steps 2}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
[[ -n "${EXIT_INTERVAL:-}" ]] && EXTRA=(--exit-interval "$EXIT_INTERVAL" "${EXTRA[@]}")

DISTRIBUTED_ARGS=(--nproc_per_node "$WORLD" --nnodes 1 --node_rank 0 --master_addr 127.0.0.1 --master_port "$MASTER_PORT")
MODEL_ARGS=(
    --num-layers 8 --hidden-size 64 --ffn-hidden-size 172 --num-attention-heads 4
    --group-query-attention --num-query-groups 2
    --seq-length 64 --max-position-embeddings 64 --position-embedding-type rope
    --normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
    --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02
)
if [[ -n "${TRAIN_SAMPLES:-}" ]]; then
    LENGTH_ARGS=(--train-samples "$TRAIN_SAMPLES" --lr-warmup-samples 16)
else
    LENGTH_ARGS=(--train-iters "$TRAIN_ITERS" --lr-warmup-iters 2)
fi
if [[ -n "${BATCH_SCHEDULE:-}" ]]; then
    BATCH_ARGS=(--step-batch-size-schedule "$BATCH_SCHEDULE")
else
    BATCH_ARGS=(--global-batch-size 8)
fi
TRAINING_ARGS=(
    --micro-batch-size 2 "${BATCH_ARGS[@]}" "${LENGTH_ARGS[@]}"
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234
)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
# CPU: gloo, the local (torch) spec, and no CUDA-only fusions (docs/megatron.md §4).
CPU_ARGS=(
    --distributed-backend gloo --transformer-impl local --use-cpu-initialization
    --no-rope-fusion --no-persist-layer-norm --no-gradient-accumulation-fusion
    --no-bias-swiglu-fusion --no-bias-dropout-fusion --no-masked-softmax-fusion
)
DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 511 --split 949,50,1)
EVAL_AND_LOGGING_ARGS=(
    --log-interval 1 --eval-interval 10 --eval-iters 2
    --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval 10 --ckpt-format torch_dist
    --tensorboard-dir "$SAVE_DIR/../tensorboard"
)

ALL_ARGS=(
    "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${CPU_ARGS[@]}"
    "${DATA_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}" "${PRORES_ARGS[@]}" "${EXTRA[@]}"
)

export OMP_NUM_THREADS=1 CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1
cd "$ROOT"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    NNODES=1 NODE_RANK=0 GPUS_PER_NODE=$WORLD MASTER_ADDR=127.0.0.1
    source "$ROOT/examples/scripts/dry_run_lib.sh"
    prores_dry_run --dry-run-launcher "$(printf '%q ' "$PYTHON" -m torch.distributed.run)" -- "${ALL_ARGS[@]}"
fi
exec "$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" -m prores_megatron.training.pretrain_gpt "${ALL_ARGS[@]}"

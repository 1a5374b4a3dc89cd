#!/usr/bin/env bash
# Llama-2-7B-shaped pretraining with ProRes on H100s: Transformer Engine, FP8 (hybrid, current
# (tensorwise) scaling by default, FP8_RECIPE) with bf16, TP=2 + sequence parallel, distributed optimizer with
# overlapped grad reduce-scatter / param all-gather, selective recompute, torch_dist checkpoints,
# TensorBoard. Run it on every node (torchrun, one process per GPU); defaults: 8 nodes x 8 GPUs.
#
#   DRY_RUN=1 bash examples/scripts/pretrain_llama2_7b_prores.sh
# checks everything without a GPU: Megatron-LM's and ProRes's argument validation for this world
# size, the layer -> pipeline stage table, the alpha plan, the parameter count, and the exact
# torchrun command (python -m prores_megatron.training.dry_run; DRY_RUN_ARGS=--json for machine output).
#
# Environment (positional arguments 1-4 override the paths, Megatron-LM example style):
#   NNODES, NODE_RANK, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT   torchrun rendezvous (8, 0, 8, localhost, 6000)
#   CHECKPOINT_PATH ($1)        --save/--load directory (default runs/llama2_7b_prores/checkpoints)
#   TENSORBOARD_LOGS_PATH ($2)  TensorBoard directory (default runs/llama2_7b_prores/tensorboard)
#   TOKENIZER_MODEL ($3)        Llama-2 SentencePiece tokenizer.model
#   DATA_PATH ($4)              indexed-dataset prefix(es) (PREFIX.bin/.idx), e.g. "0.7 A_text_document 0.3 B_text_document"
#   MOCK=1                      synthetic data and NullTokenizer (no data or tokenizer needed)
#   TP (2), PP (1)              tensor / pipeline parallel sizes
#   MICRO_BATCH_SIZE (1), GLOBAL_BATCH_SIZE (1024), TRAIN_ITERS (100000)
#   PRORES_SCHEDULE (linear), PRORES_WARMUP_STEPS (1000: layer l reaches alpha = 1 at step 1000*l)
#   FP8_RECIPE (tensorwise)     FP8 scaling: tensorwise (current), delayed, or none (bf16 only)
#   EXTRA_ARGS                  more Megatron-LM / ProRes flags, appended last (they win)
#   PYTHON                      dry-run interpreter (default: the project environment)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN_DIR="$ROOT/runs/llama2_7b_prores"

NNODES=${NNODES:-8}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
CHECKPOINT_PATH=${1:-${CHECKPOINT_PATH:-$RUN_DIR/checkpoints}}
TENSORBOARD_LOGS_PATH=${2:-${TENSORBOARD_LOGS_PATH:-$RUN_DIR/tensorboard}}
TOKENIZER_MODEL=${3:-${TOKENIZER_MODEL:-}}
DATA_PATH=${4:-${DATA_PATH:-}}
MOCK=${MOCK:-0}
DRY_RUN=${DRY_RUN:-0}
TP=${TP:-2}
PP=${PP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-1024}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
PRORES_SCHEDULE=${PRORES_SCHEDULE:-linear}
PRORES_WARMUP_STEPS=${PRORES_WARMUP_STEPS:-1000}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

DISTRIBUTED_ARGS=(
    --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
)
MODEL_ARGS=(
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32
    --seq-length 4096 --max-position-embeddings 4096
    --position-embedding-type rope --rotary-base 10000 --rotary-percent 1.0
    --swiglu --normalization RMSNorm --norm-epsilon 1e-5
    --untie-embeddings-and-output-weights --disable-bias-linear
    --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02
    --transformer-impl transformer_engine --attention-backend auto
)
TRAINING_ARGS=(
    --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
    --train-iters "$TRAIN_ITERS"
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    # Megatron's default selective recompute (core_attn): stores Q/K/V instead of the attention
    # output; costs one extra attention forward per layer (~4 % of the FLOPs at seq 4096).
    --recompute-granularity selective
)
# Precision from FP8_RECIPE (tensorwise by default; delayed, none): precision_lib.sh says why.
source "$ROOT/examples/scripts/precision_lib.sh"
prores_dtype_args
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP" --sequence-parallel --pipeline-model-parallel-size "$PP"
)
DDP_ARGS=(--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
if [[ "$MOCK" == 1 ]]; then
    DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --split 99,1,0)
else
    if [[ -z "$DATA_PATH" || -z "$TOKENIZER_MODEL" ]]; then
        echo "pretrain_llama2_7b_prores.sh: set DATA_PATH (indexed-dataset prefix) and" \
             "TOKENIZER_MODEL (Llama-2 tokenizer.model), or MOCK=1 for synthetic data" >&2
        exit 2
    fi
    read -r -a DATA_PATH_ARR <<< "$DATA_PATH"
    DATA_ARGS=(--data-path "${DATA_PATH_ARR[@]}" --split 99,1,0
               --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL")
fi
EVAL_AND_LOGGING_ARGS=(
    --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval 1000 --ckpt-format torch_dist
    --log-interval 1 --eval-interval 1000 --eval-iters 10
    --tensorboard-dir "$TENSORBOARD_LOGS_PATH" --log-throughput --distributed-timeout-minutes 60
)
PRORES_ARGS=(--prores-schedule "$PRORES_SCHEDULE" --prores-warmup-steps "$PRORES_WARMUP_STEPS")
ALL_ARGS=(
    "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DTYPE_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}"
    "${DDP_ARGS[@]}" "${DATA_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}" "${PRORES_ARGS[@]}" "${EXTRA[@]}"
)

# TP/SP comm ordering on Hopper needs one hardware queue (Megatron-LM asserts it for TP > 1).
export CUDA_DEVICE_MAX_CONNECTIONS=1
if [[ "$DRY_RUN" == 1 ]]; then
    source "$ROOT/examples/scripts/dry_run_lib.sh"
    # Llama-2's tokenizer has 32000 tokens: the parameter count uses it when tokenizer.model is not here.
    prores_dry_run --dry-run-vocab-size 32000 -- "${ALL_ARGS[@]}"
fi
if [[ "$MOCK" != 1 && ! -f "$TOKENIZER_MODEL" ]]; then
    echo "pretrain_llama2_7b_prores.sh: TOKENIZER_MODEL=$TOKENIZER_MODEL is not a file" >&2
    exit 2
fi
mkdir -p "$CHECKPOINT_PATH" "$TENSORBOARD_LOGS_PATH"
exec torchrun "${DISTRIBUTED_ARGS[@]}" -m prores_megatron.training.pretrain_gpt "${ALL_ARGS[@]}"

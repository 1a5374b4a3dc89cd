# Sourced by the GPU launch scripts: the flag groups both flagship shapes share, so they cannot
# drift apart. Each function fills one array from the environment (defaults in brackets); the
# shape scripts add their model and parallel layout. Every flag here is checked by Megatron-LM's
# own argument validation in the dry run (tests/training/test_launch_scripts.py).

# prores_run_dir NAME: RUN_DIR (required for a launch: checkpoints never default into the
# repository), CHECKPOINT_PATH [$RUN_DIR/checkpoints], TENSORBOARD_LOGS_PATH [$RUN_DIR/tensorboard].
prores_run_dir() {
    local name=$1
    if [[ -z "${RUN_DIR:-}" && ( -z "${CHECKPOINT_PATH:-}" || -z "${TENSORBOARD_LOGS_PATH:-}" ) ]]; then
        if [[ "${DRY_RUN:-0}" == 1 ]]; then
            RUN_DIR="/path/to/RUN_DIR"  # a dry run writes nothing; the printed command shows the placeholder
        else
            echo "$name: set RUN_DIR (checkpoints, TensorBoard, caches; on a shared filesystem, not in the" \
                 "repository), or CHECKPOINT_PATH and TENSORBOARD_LOGS_PATH" >&2
            return 2
        fi
    fi
    RUN_DIR=${RUN_DIR:-$(dirname "$CHECKPOINT_PATH")}
    CHECKPOINT_PATH=${CHECKPOINT_PATH:-$RUN_DIR/checkpoints}
    TENSORBOARD_LOGS_PATH=${TENSORBOARD_LOGS_PATH:-$RUN_DIR/tensorboard}
}

# The Llama architecture the GPU scripts train (RoPE, SwiGLU, RMSNorm, no biases, untied embeddings,
# Transformer Engine layers): `prores_llama_args HIDDEN FFN HEADS SEQ` sets MODEL_ARGS, without
# --num-layers (each script adds its depth).
prores_llama_args() {
    MODEL_ARGS=(
        --hidden-size "$1" --ffn-hidden-size "$2" --num-attention-heads "$3"
        --seq-length "$4" --max-position-embeddings "$4"
        --position-embedding-type rope --rotary-base 10000 --rotary-percent 1.0
        --swiglu --normalization RMSNorm --norm-epsilon 1e-5
        --untie-embeddings-and-output-weights --disable-bias-linear
        --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02
        --transformer-impl transformer_engine --attention-backend auto
    )
}

# DTYPE_ARGS from FP8_RECIPE:
#   tensorwise [default]  bf16 + FP8 hybrid (E4M3 forward, E5M2 gradients), TE current scaling (TE >= 2.2)
#   delayed               bf16 + FP8 hybrid, TE delayed scaling (amax history 1024, max)
#   none                  bf16 only
# Why tensorwise is the default with ProRes: delayed scaling quantizes each step's gradients with a
# scale from earlier steps' amax; a branch switching on from alpha = 0 (amax 0, scale left at 1.0)
# flushes its first nonzero gradients to zero, and a ramping alpha outgrows the history for the
# following steps (docs/benchmarks.md §3 measures it). With FP8, --fp8-param-gather (NVIDIA's H100
# recipe) all-gathers FP8 weights; FP8_PARAM_GATHER=0 turns it off.
prores_dtype_args() {
    case "${FP8_RECIPE:-tensorwise}" in
        tensorwise) DTYPE_ARGS=(--bf16 --fp8-format hybrid --fp8-recipe tensorwise) ;;
        delayed) DTYPE_ARGS=(--bf16 --fp8-format hybrid --fp8-recipe delayed
                             --fp8-amax-history-len 1024 --fp8-amax-compute-algo max) ;;
        none) DTYPE_ARGS=(--bf16) ;;
        *) echo "FP8_RECIPE=${FP8_RECIPE}: choose tensorwise, delayed or none" >&2
           return 2 ;;
    esac
    if [[ "${FP8_RECIPE:-tensorwise}" != none && "${FP8_PARAM_GATHER:-1}" == 1 ]]; then
        DTYPE_ARGS+=(--fp8-param-gather)
    fi
}

# PERF_ARGS, as in Megatron-LM's H100 FP8 Llama recipe: distributed optimizer with overlapped grad
# reduce-scatter / param all-gather, gradients reduced in bf16 (GRAD_REDUCE_IN_BF16 [1]), fused
# cross-entropy (native: Megatron 0.19 refuses the TE implementation), manual GC every 100 steps
# (aligns the pauses across ranks), and, with TP > 1, sequence parallel plus TP communication /
# GEMM overlap (TP_COMM_OVERLAP [1]). No activation recompute: with TE's fused attention the
# selective "core_attn" recompute saves nothing (Megatron warns), and the scripts' READMEs show the
# dry run's memory estimate fitting without it (RECOMPUTE=full adds uniform full recompute).
prores_perf_args() {
    local tp=$1
    PERF_ARGS=(--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
               --cross-entropy-loss-fusion --cross-entropy-fusion-impl native
               --manual-gc --manual-gc-interval 100)
    [[ "${GRAD_REDUCE_IN_BF16:-1}" == 1 ]] && PERF_ARGS+=(--grad-reduce-in-bf16)
    if (( tp > 1 )); then
        PERF_ARGS+=(--sequence-parallel)
        [[ "${TP_COMM_OVERLAP:-1}" == 1 ]] && PERF_ARGS+=(--tp-comm-overlap)
    fi
    case "${RECOMPUTE:-none}" in
        none) ;;
        full) PERF_ARGS+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
        *) echo "RECOMPUTE=${RECOMPUTE}: choose none or full" >&2; return 2 ;;
    esac
}

# LIFETIME_ARGS: a job that ends on a time limit or a signal saves first. --exit-duration-in-mins
# EXIT_DURATION_MINS (the sbatch scripts compute it from the job's time limit minus 15 minutes;
# unset: no limit); --exit-signal-handler (SIGTERM, as scancel and preemption send it: save, then
# exit); --save-interval SAVE_INTERVAL [500]; ASYNC_SAVE=1: --async-save (torch_dist, writes in
# the background); NON_PERSISTENT_SAVE_INTERVAL=N: a global non-persistent checkpoint every N steps
# in $RUN_DIR/nonpersistent, which a resume takes when it is newer than the last persistent one.
prores_lifetime_args() {
    LIFETIME_ARGS=(--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --ckpt-format torch_dist
                   --save-interval "${SAVE_INTERVAL:-500}" --exit-signal-handler)
    [[ -n "${EXIT_DURATION_MINS:-}" ]] && LIFETIME_ARGS+=(--exit-duration-in-mins "$EXIT_DURATION_MINS")
    [[ "${ASYNC_SAVE:-0}" == 1 ]] && LIFETIME_ARGS+=(--async-save)
    if [[ -n "${NON_PERSISTENT_SAVE_INTERVAL:-}" ]]; then
        LIFETIME_ARGS+=(--non-persistent-save-interval "$NON_PERSISTENT_SAVE_INTERVAL"
                        --non-persistent-ckpt-type global --non-persistent-global-ckpt-dir "$RUN_DIR/nonpersistent")
    fi
    return 0
}

# LOGGING_ARGS: every iteration's loss, throughput, timers and memory to the log and TensorBoard;
# W&B when WANDB_PROJECT is set (WANDB_EXP_NAME [the script's name]); the ProRes depth monitor
# every PRORES_MONITOR_INTERVAL [100] iterations (0: off; about 4 % of one iteration's time on a
# monitored one, docs/benchmarks.md).
prores_logging_args() {
    local name=$1
    LOGGING_ARGS=(--log-interval 1 --eval-interval "${EVAL_INTERVAL:-1000}" --eval-iters 10
                  --tensorboard-dir "$TENSORBOARD_LOGS_PATH" --log-throughput --log-timers-to-tensorboard
                  --log-memory-to-tensorboard --log-validation-ppl-to-tensorboard
                  --distributed-timeout-minutes 60 --prores-monitor-interval "${PRORES_MONITOR_INTERVAL:-100}")
    if [[ -n "${WANDB_PROJECT:-}" ]]; then
        LOGGING_ARGS+=(--wandb-project "$WANDB_PROJECT" --wandb-exp-name "${WANDB_EXP_NAME:-$name}"
                       --wandb-save-dir "$RUN_DIR/wandb")
    fi
    return 0
}

# PROFILE_ARGS and LAUNCH_PREFIX: PROFILE=1 profiles steps PROFILE_STEP_START..PROFILE_STEP_END
# [10..12] of ranks PROFILE_RANKS [0] under Nsight Systems (nsys starts with capture off; Megatron's
# --profile opens it with cudaProfilerStart), one report per node in $RUN_DIR/profile;
# PROFILE=torch uses torch.profiler instead (traces in the TensorBoard directory).
prores_profile_args() {
    PROFILE_ARGS=()
    LAUNCH_PREFIX=()
    local steps=(--profile --profile-step-start "${PROFILE_STEP_START:-10}"
                 --profile-step-end "${PROFILE_STEP_END:-12}" --profile-ranks "${PROFILE_RANKS:-0}")
    case "${PROFILE:-0}" in
        0) ;;
        1) PROFILE_ARGS=("${steps[@]}")
           LAUNCH_PREFIX=(nsys profile -s none -t cuda,nvtx,osrt --capture-range=cudaProfilerApi
                          --capture-range-end=stop --force-overwrite true
                          -o "$RUN_DIR/profile/node${NODE_RANK}") ;;
        torch) PROFILE_ARGS=("${steps[@]}" --use-pytorch-profiler) ;;
        *) echo "PROFILE=${PROFILE}: choose 0, 1 (nsys) or torch" >&2; return 2 ;;
    esac
}

# DATA_ARGS: MOCK=1 synthetic data (NullTokenizer, 32000 tokens), else DATA_PATH + TOKENIZER_MODEL
# (Llama-2's SentencePiece); both with the index cache in $RUN_DIR/data_cache (one shared copy, not
# next to the data), NUM_WORKERS [2] loader workers, and no attention mask built in the loader (TE's
# causal fused attention does not read it).
prores_data_args() {
    local name=$1
    local common=(--split 99,1,0 --data-cache-path "$RUN_DIR/data_cache" --num-workers "${NUM_WORKERS:-2}"
                  --no-create-attention-mask-in-dataloader)
    if [[ "${MOCK:-0}" == 1 ]]; then
        DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 32000 "${common[@]}")
        return 0
    fi
    if [[ -z "${DATA_PATH:-}" || -z "${TOKENIZER_MODEL:-}" ]]; then
        echo "$name: set DATA_PATH (indexed-dataset prefix) and TOKENIZER_MODEL (Llama-2 tokenizer.model)," \
             "or MOCK=1 for synthetic data" >&2
        return 2
    fi
    local prefixes
    read -r -a prefixes <<< "$DATA_PATH"
    DATA_ARGS=(--data-path "${prefixes[@]}" --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL"
               "${common[@]}")
}

# The process environment NVIDIA's recipes set, each overridable: one CUDA hardware queue (TP/SP
# ordering; Megatron asserts it for TP > 1); no record_stream in NCCL's allocator use; the IB
# timeout of the recipes; SM margins for TE's norms so TP-overlap kernels keep SMs; 2 MiB NCCL
# point-to-point chunks (pipeline sends across nodes); a Triton cache per node and job (a shared
# home directory would serialise every rank's kernel compiles). NCCL_IB_HCA, NCCL_SOCKET_IFNAME
# and the like are the cluster's and pass through unchanged.
prores_cluster_env() {
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-19}
    export NVTE_FWD_LAYERNORM_SM_MARGIN=${NVTE_FWD_LAYERNORM_SM_MARGIN:-16}
    export NVTE_BWD_LAYERNORM_SM_MARGIN=${NVTE_BWD_LAYERNORM_SM_MARGIN:-16}
    export NCCL_P2P_NET_CHUNKSIZE=${NCCL_P2P_NET_CHUNKSIZE:-2097152}
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache-${USER:-user}-${SLURM_JOB_ID:-local}-node${NODE_RANK:-0}}
}

# prores_paths NAME [CHECKPOINT_PATH [TENSORBOARD_LOGS_PATH [TOKENIZER_MODEL [DATA_PATH]]]]: the
# positional arguments (Megatron-LM example style) over the variables, then prores_run_dir.
prores_paths() {
    local name=$1
    shift
    CHECKPOINT_PATH=${1:-${CHECKPOINT_PATH:-}}
    TENSORBOARD_LOGS_PATH=${2:-${TENSORBOARD_LOGS_PATH:-}}
    TOKENIZER_MODEL=${3:-${TOKENIZER_MODEL:-}}
    DATA_PATH=${4:-${DATA_PATH:-}}
    [[ -n "$CHECKPOINT_PATH" ]] || unset CHECKPOINT_PATH
    [[ -n "$TENSORBOARD_LOGS_PATH" ]] || unset TENSORBOARD_LOGS_PATH
    prores_run_dir "$name"
}

# prores_shared_groups NAME TP: every group above into SHARED_ARGS (LAUNCH_PREFIX from profiling).
prores_shared_groups() {
    local name=$1 tp=$2
    prores_dtype_args
    prores_perf_args "$tp"
    prores_data_args "$name"
    prores_lifetime_args
    prores_logging_args "$name"
    prores_profile_args
    SHARED_ARGS=("${DTYPE_ARGS[@]}" "${PERF_ARGS[@]}" "${DATA_ARGS[@]}" "${LIFETIME_ARGS[@]}"
                 "${LOGGING_ARGS[@]}" "${PROFILE_ARGS[@]}")
}

# prores_launch NAME: with DRY_RUN=1 the dry run of ALL_ARGS (vocabulary 32000, Llama-2's, when the
# tokenizer file is not here), else one torchrun for this node with the process environment above.
# Never returns.
prores_launch() {
    local name=$1
    local distributed=(--nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
                       --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    prores_cluster_env
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        source "$ROOT/examples/scripts/dry_run_lib.sh"
        prores_dry_run --dry-run-vocab-size 32000 -- "${ALL_ARGS[@]}"
    fi
    if [[ "${MOCK:-0}" != 1 && ! -f "$TOKENIZER_MODEL" ]]; then
        echo "$name: TOKENIZER_MODEL=$TOKENIZER_MODEL is not a file" >&2
        exit 2
    fi
    mkdir -p "$CHECKPOINT_PATH" "$TENSORBOARD_LOGS_PATH" "$RUN_DIR/data_cache"
    if [[ "${PROFILE:-0}" == 1 ]]; then mkdir -p "$RUN_DIR/profile"; fi
    exec "${LAUNCH_PREFIX[@]}" "$PYTHON" -m torch.distributed.run "${distributed[@]}" \
        -m prores_megatron.training.pretrain_gpt "${ALL_ARGS[@]}"
}

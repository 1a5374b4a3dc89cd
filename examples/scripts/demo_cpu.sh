#!/usr/bin/env bash
# The main job: ProRes vs the plain model on real English text, on CPU, through Megatron-LM's own
# training loop (pipeline parallel, 2 ranks on gloo), then a Hugging Face export, text generation
# with transformers and a report. About 13 minutes on 2 cores (see README).
#   DEMO_DIR     output folder (default runs/demo; reruns reuse the data and finished runs)
#   CORPUS       your own text (.txt, .jsonl with a "text" key, .gz) instead of the demo corpus
#   TRAIN_ITERS (300)  NUM_LAYERS (48)  HIDDEN (64)  SEQ (64)  VOCAB (4096)  PP (2)  TP (1)
#   T_RULE (paper: T = min(N/100, 0.6 N/L) per layer, as benchmarks/bench_depth.py)  WARMUP_T (a fixed
#   T instead)  LR (3e-3)  SEED (1234)  MICRO_BATCH (8, of a global batch of 16)  MONITOR_INTERVAL (25)
#   EVAL_INTERVAL (100)
#   DATA_DIR     tokenizer + dataset folder (default DEMO_DIR/data; share it between runs)
#   TRAIN_ONLY=1 stop after the two trainings and the summary
#   PYTHON       interpreter (default: the project environment, built on first use)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then source "$ROOT/tools/setup_env.sh"; PYTHON="$PRORES_PY"; fi
DEMO_DIR=${DEMO_DIR:-$ROOT/runs/demo}
TRAIN_ITERS=${TRAIN_ITERS:-300}; NUM_LAYERS=${NUM_LAYERS:-48}; HIDDEN=${HIDDEN:-64}; SEQ=${SEQ:-64}
VOCAB=${VOCAB:-4096}; PP=${PP:-2}; TP=${TP:-1}; SEED=${SEED:-1234}; LR=${LR:-3e-3}; MICRO_BATCH=${MICRO_BATCH:-8}
if [[ -n "${WARMUP_T:-}" ]]; then T_RULE="fixed:$WARMUP_T"; fi; T_RULE=${T_RULE:-paper}
MONITOR_INTERVAL=${MONITOR_INTERVAL:-25}; EVAL_INTERVAL=${EVAL_INTERVAL:-100}
export OMP_NUM_THREADS=1 CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
DATA="${DATA_DIR:-$DEMO_DIR/data}"; mkdir -p "$DATA" "$DEMO_DIR"
START=$(date +%s)
say() { printf '\n[demo %4ds] %s\n' $(( $(date +%s) - START )) "$*"; }
cd "$ROOT"
# The depth study's T rule (one definition: benchmarks/bench_depth.py), so the demo matches its numbers.
WARMUP_T=$("$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); from bench_depth import warmup_steps
print(repr(warmup_steps('$T_RULE', $TRAIN_ITERS, $NUM_LAYERS)))")

say "1/6 corpus"
if [[ -z "${CORPUS:-}" ]]; then
    CORPUS=$("$PYTHON" -m prores_megatron.data.demo_corpus)
fi
echo "text: $CORPUS"
if [[ ! -f "$DATA/tok.model" ]]; then
    say "2/6 SentencePiece tokenizer (vocab $VOCAB)"
    "$PYTHON" -m prores_megatron.data.tokenizer_training --input "$CORPUS" --json-keys text \
        --output-prefix "$DATA/tok" --vocab-size "$VOCAB"
fi
if [[ ! -f "$DATA/demo_text_document.idx" ]]; then
    say "3/6 Megatron indexed dataset"
    # One worker: on the 3.5 MB corpus 2 workers were slower (13.7 s forked, 21.4 s from a forkserver,
    # against 12.3 s), since starting a worker costs more than its share of the tokenizing.
    "$PYTHON" -m prores_megatron.data.indexed_data --input "$CORPUS" --json-keys text \
        --output-prefix "$DATA/demo" --tokenizer-type GPTSentencePieceTokenizer \
        --tokenizer-model "$DATA/tok.model" --append-eod --workers 1
fi

MODEL_ARGS=(
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --ffn-hidden-size $((HIDDEN * 8 / 3 / 4 * 4))
    --num-attention-heads 4 --group-query-attention --num-query-groups 2
    --seq-length "$SEQ" --max-position-embeddings "$SEQ" --position-embedding-type rope
    --normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
    --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02
)
TRAINING_ARGS=(
    --micro-batch-size "$MICRO_BATCH" --global-batch-size 16 --train-iters "$TRAIN_ITERS" --seed "$SEED"
    --lr "$LR" --min-lr "$("$PYTHON" -c "print(repr($LR / 10))")" --lr-decay-style cosine --lr-warmup-iters $((TRAIN_ITERS / 10))
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
)
CPU_ARGS=(
    --distributed-backend gloo --transformer-impl local --use-cpu-initialization --num-workers 0
    --no-rope-fusion --no-persist-layer-norm --no-gradient-accumulation-fusion
    --no-bias-swiglu-fusion --no-bias-dropout-fusion --no-masked-softmax-fusion
)
DATA_ARGS=(
    --data-path "$DATA/demo_text_document" --split 90,10,0
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$DATA/tok.model"
)
train() {  # train NAME PRORES-FLAGS...
    local name=$1; shift
    local dir="$DEMO_DIR/$name"
    if [[ "$(cat "$dir/ckpt/latest_checkpointed_iteration.txt" 2>/dev/null)" == "$TRAIN_ITERS" ]]; then
        echo "$name: already trained to $TRAIN_ITERS iterations ($dir)"; return
    fi
    rm -rf "$dir"; mkdir -p "$dir"
    "$PYTHON" -m torch.distributed.run --nproc_per_node $((TP * PP)) --nnodes 1 \
        --master_addr 127.0.0.1 --master_port $((20000 + RANDOM % 20000)) -m prores_megatron.training.pretrain_gpt \
        "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${CPU_ARGS[@]}" "${DATA_ARGS[@]}" \
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
        --log-interval 10 --eval-interval "$EVAL_INTERVAL" --eval-iters 10 \
        --data-cache-path "$dir/data_cache" \
        --save "$dir/ckpt" --save-interval "$TRAIN_ITERS" --ckpt-format torch_dist \
        --tensorboard-dir "$dir/tensorboard" --prores-monitor-interval "$MONITOR_INTERVAL" \
        --prores-spike-window 100 --prores-spike-min-history 20 "$@" 2>&1 \
        | tee "$dir/train.log" | grep --line-buffered -E "\] iteration +[0-9]+/|validation loss at|ProRes:|[Ee]rror([: ]|$)|Traceback" \
        | sed -u -E 's/.*iteration +([0-9]+)\/ *([0-9]+) .*per iteration \(ms\): ([0-9.]+) .*lm loss: ([^ ]+) .*grad norm: ([^ ]+) .*/  iteration \1\/\2  lm loss \4  grad norm \5  (\3 ms per iteration)/; s/^-+$//' \
        | sed -u "s/^/[$name] /"
}
# Both trainings at once (2 x PP ranks on the 2 cores): a pipeline stage idles in the bubble and
# while its peer computes, so side by side they finish in 2/3 of the time of one after the other
# (48 layers: 2.0 s per step each side by side, 1.5 s alone). If one fails, the other is stopped
# (SIGTERM to its launcher, which stops its ranks) and the demo exits with an error.
train_both() {  # train_both PRORES-FLAGS... -- BASELINE-FLAGS...
    local -a prores=() baseline=(); local into=prores arg
    for arg in "$@"; do
        if [[ "$arg" == "--" ]]; then into=baseline
        elif [[ $into == prores ]]; then prores+=("$arg"); else baseline+=("$arg"); fi
    done
    train prores "${prores[@]}" &
    train baseline "${baseline[@]}" &
    wait_both "a training failed; see $DEMO_DIR/prores/train.log and $DEMO_DIR/baseline/train.log"
}
wait_both() {  # wait_both MESSAGE [LOG...]: the script's two background jobs must both succeed; on the
    local message=$1 job _; shift  # first failure stop the other, print the logs and MESSAGE, exit 1
    for _ in 1 2; do
        if ! wait -n; then
            # A job is a pipeline's subshell (stop its children: the launcher stops its ranks) or a plain command.
            for job in $(jobs -p); do pkill -TERM -P "$job" 2>/dev/null || true; kill -TERM "$job" 2>/dev/null || true; done
            wait || true
            if (( $# )); then cat "$@" >&2; fi
            echo "demo: $message" >&2
            exit 1
        fi
    done
}
say "4/6 training: ProRes (linear, T = $WARMUP_T steps per layer, rule $T_RULE) and the baseline, $NUM_LAYERS layers, PP=$PP"
train_both --prores-schedule linear --prores-warmup-steps "$WARMUP_T" -- --prores-schedule none
# Final validation loss on every held-out token (about 100k), with standard errors; then what the
# depth sweep measured across seeds for this recipe (benchmarks/results/bench_depth.json).
for name in prores baseline; do  # side by side, one thread each
    "$PYTHON" -m prores_megatron.analysis.cli heldout --checkpoint "$DEMO_DIR/$name/ckpt" \
        --out "$DEMO_DIR/$name/heldout.json" > "$DEMO_DIR/$name/heldout.log" 2>&1 &
done
wait_both "heldout failed" "$DEMO_DIR/prores/heldout.log" "$DEMO_DIR/baseline/heldout.log"
for name in prores baseline; do grep -E "held-out loss" "$DEMO_DIR/$name/heldout.log" | sed "s/^/[$name] /"; done
"$PYTHON" benchmarks/depth_report.py --prores "$DEMO_DIR/prores/heldout.json" --baseline "$DEMO_DIR/baseline/heldout.json" \
    --benchmark benchmarks/results/bench_depth.json --depth "$NUM_LAYERS" --iters "$TRAIN_ITERS" --t-rule "$T_RULE" \
    --lr "$LR" | tee "$DEMO_DIR/summary.txt"
if [[ -n "${TRAIN_ONLY:-}" ]]; then say "done (TRAIN_ONLY): $DEMO_DIR/summary.txt"; exit 0; fi

say "5/6 Hugging Face export of the ProRes model, and text from transformers"
"$PYTHON" -m prores_megatron.export.convert_to_hf "$DEMO_DIR/prores/ckpt" "$DEMO_DIR/hf" --force \
    --dtype float32 --tokenizer-model "$DATA/tok.model"
"$PYTHON" tools/generate_hf.py "$DEMO_DIR/hf" --max-new-tokens 30 | tee "$DEMO_DIR/generated.txt"

say "6/6 report"
"$PYTHON" -m prores_megatron.analysis.cli report --run "prores=$DEMO_DIR/prores" --run "baseline=$DEMO_DIR/baseline" \
    --out "$DEMO_DIR/report" --summary "$DEMO_DIR/summary.txt" --title "ProRes vs baseline: $NUM_LAYERS-layer Llama on the demo corpus (CPU)" \
    --spike-window 100 --spike-min-history 20
cat "$DEMO_DIR/summary.txt"
say "done: report $DEMO_DIR/report/report.md, export $DEMO_DIR/hf, text $DEMO_DIR/generated.txt"

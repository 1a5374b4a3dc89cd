#!/usr/bin/env bash
# The paper's depth study (Fig. 1-2) on GPUs: its 71M family (hidden 512, 8 heads, FFN 1368,
# Llama-style: RMSNorm, SwiGLU, RoPE, no biases, untied embeddings, 32k Llama tokenizer, seq 1024) at
# 24, 48, 72, 96 and 120 layers, each trained twice, identically but for ProRes: `linear` with
# T = 1000 steps per layer up to 72 layers and 500 beyond, and the plain Pre-LN baseline
# (--prores-schedule none). The paper's recipe (docs/method.md §7): AdamW (0.9, 0.95), eps 1e-8, weight
# decay 0.1, clip 1.0, lr 2e-3, 512 x 1024 tokens per step, 100k steps (52.4 B tokens), WSD schedule:
# 2000 warmup steps, constant, linear decay to 0 over the last 10 %; truncated-normal init, std 0.02
# everywhere (--prores-init plain); held-out evaluation of 20 x 512 x 1024 = 10.5 M tokens (the paper's
# 10 M). GPU-hours and how to read the results: docs/benchmarks.md §7.
#
#   bash examples/scripts/depth_study_gpu.sh [--budget F] [--depths 24,48,...] [--variants prores,baseline]
#                                            [--dry-run | --analyze]
#
#   --budget F     0 < F <= 1: F x 100k steps; the LR warmup (2 %), the WSD decay (10 %) and T scale
#                  with the steps, so T·L keeps its share of the run (budget 0.1 at 120 layers:
#                  10,000 steps, T = 50, all layers on at step 6,000 = 60 %, as 60k of 100k). Default 1
#   --depths LIST  comma-separated numbers of layers (default 24,48,72,96,120)
#   --variants     prores, baseline or both (default prores,baseline)
#   --dry-run      (or DRY_RUN=1) validate every configuration on CPU, no GPU
#                  (python -m prores_megatron.training.dry_run for this launch's world size, one report
#                  per configuration on stdout, DRY_RUN_ARGS=--json for JSON); exit 2 if any is refused
#   --analyze      no training: `prores-megatron depth` over RUN_DIR's runs, writing Figure 1 (final
#                  validation perplexity against depth), the spike scores and a table to
#                  $RUN_DIR/analysis (ANALYSIS_DIR)
#
# Runs go one after the other on this launch's GPUs, each in RUN_DIR/L<layers>_<variant>/
# (checkpoints/ with the ProRes monitor's prores_monitor.jsonl, tensorboard/); a run whose
# checkpoint tracker already says TRAIN_ITERS is skipped, an interrupted one resumes. To spread the
# study over several jobs, give each its own --depths / --variants and the same RUN_DIR; use one
# RUN_DIR per --budget.
#
# Environment:
#   RUN_DIR                the study's directory (required to launch; a placeholder in a dry run)
#   MOCK=1                 synthetic data; else DATA_PATH (Megatron indexed-dataset prefix(es) of any
#                          tokenized corpus, the paper's is C4-en) and TOKENIZER_MODEL (Llama-2's
#                          SentencePiece tokenizer.model, 32000 tokens)
#   NNODES, NODE_RANK, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT   torchrun rendezvous (1, 0, 8, -, 6000);
#                          from SLURM inside a job (launch_lib.sh). The dry run checks this world size
#   TP (1), PP (1), MICRO_BATCH_SIZE (8), GLOBAL_BATCH_SIZE (512), SEED (1234, both variants: same data
#                          order and initial weights), PRORES_INIT (plain), LR (2e-3)
#   DEPTHS, BUDGET, VARIANTS   defaults of the three options (for sbatch, which passes no arguments)
#   FP8_RECIPE (none: bf16; hidden 512 is too narrow for FP8 to pay), EVAL_INTERVAL (TRAIN_ITERS / 20),
#   SAVE_INTERVAL (TRAIN_ITERS / 10; NON_PERSISTENT_SAVE_INTERVAL=N adds a rolling restart point)
#   flag_groups.sh: PRORES_MONITOR_INTERVAL, WANDB_PROJECT, PROFILE, NUM_WORKERS, EXIT_DURATION_MINS, ...
#   EXTRA_ARGS             more flags, appended last to every run
#   PYTHON                 interpreter of the dry run, the launch and the analysis (launch_lib.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NAME=depth_study_gpu.sh
source "$ROOT/examples/scripts/launch_lib.sh"
source "$ROOT/examples/scripts/flag_groups.sh"

# The paper's depth study (docs/method.md §7): steps, and T per layer by depth.
PAPER_STEPS=100000
paper_warmup_per_layer() { if (( $1 <= 72 )); then echo 1000; else echo 500; fi; }

usage() { awk 'NR >= 12 && /^set -euo/ { exit } NR >= 12 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }
refuse() { echo "$NAME: $*" >&2; exit 2; }

BUDGET=${BUDGET:-1}
DEPTHS=${DEPTHS:-24,48,72,96,120}
VARIANTS=${VARIANTS:-prores,baseline}
MODE=train
[[ "${DRY_RUN:-0}" == 1 ]] && MODE=dry-run
while [[ $# -gt 0 ]]; do
    case "$1" in
        --budget|--depths|--variants)
            [[ $# -ge 2 ]] || refuse "$1 needs a value"
            case "$1" in --budget) BUDGET=$2 ;; --depths) DEPTHS=$2 ;; --variants) VARIANTS=$2 ;; esac
            shift 2 ;;
        --budget=*) BUDGET=${1#*=}; shift ;;
        --depths=*) DEPTHS=${1#*=}; shift ;;
        --variants=*) VARIANTS=${1#*=}; shift ;;
        --dry-run) MODE=dry-run; shift ;;
        --analyze) MODE=analyze; shift ;;
        -h|--help) usage; exit 0 ;;
        *) refuse "unknown argument '$1' (--budget F, --depths LIST, --variants LIST, --dry-run, --analyze)" ;;
    esac
done

# --budget: a number with 0 < F <= 1, refused before anything starts.
[[ "$BUDGET" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] ||
    refuse "--budget '$BUDGET' is not a number: give the fraction of the paper's 100k steps to train, 0 < F <= 1"
awk -v f="$BUDGET" 'BEGIN { exit !(f > 0 && f <= 1) }' ||
    refuse "--budget $BUDGET is outside 0 < F <= 1 (1 = the paper's 100k steps; 0.1 = 10k steps)"
# Every length is a fixed share of TRAIN_ITERS, so the run keeps the paper's proportions:
# LR warmup 2 % (2000 of 100k), WSD decay 10 %, T·L the paper's share (T scaled by the same factor).
TRAIN_ITERS=$(awk -v f="$BUDGET" -v n="$PAPER_STEPS" 'BEGIN { printf "%d", f * n + 0.5 }')
LR_WARMUP_ITERS=$(( (TRAIN_ITERS + 25) / 50 ))
LR_DECAY_ITERS=$(( (TRAIN_ITERS + 5) / 10 ))
(( LR_WARMUP_ITERS >= 1 )) ||
    refuse "--budget $BUDGET gives $TRAIN_ITERS steps, too few for one LR-warmup step (2 %): use --budget >= 0.00025 (25 steps)"

[[ "$DEPTHS" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] ||
    refuse "--depths '$DEPTHS': give comma-separated numbers of layers, e.g. --depths 24,48,72,96,120"
[[ "$VARIANTS" =~ ^(prores|baseline)(,(prores|baseline))?$ ]] ||
    refuse "--variants '$VARIANTS': give prores, baseline or prores,baseline"
IFS=, read -r -a DEPTH_LIST <<< "$DEPTHS"
IFS=, read -r -a VARIANT_LIST <<< "$VARIANTS"

prores_python
if [[ "$MODE" == analyze ]]; then
    [[ -n "${RUN_DIR:-}" ]] || refuse "--analyze: set RUN_DIR to the study's directory"
    cd "$ROOT"  # so `-m prores_megatron` resolves even with an interpreter that lacks the package
    exec "$PYTHON" -m prores_megatron.analysis.cli depth --study-dir "$RUN_DIR" \
        --out "${ANALYSIS_DIR:-$RUN_DIR/analysis}"
fi
[[ "$MODE" == dry-run ]] && export DRY_RUN=1
prores_rendezvous "$NAME" 1
unset CHECKPOINT_PATH TENSORBOARD_LOGS_PATH  # each run's own, under RUN_DIR
prores_run_dir "$NAME"
STUDY_DIR=$RUN_DIR

TP=${TP:-1}
PP=${PP:-1}
export FP8_RECIPE=${FP8_RECIPE:-none}
EVAL_INTERVAL=${EVAL_INTERVAL:-$(( TRAIN_ITERS >= 20 ? TRAIN_ITERS / 20 : 1 ))}
# A torch_dist checkpoint holds ~14 bytes per parameter (bf16 weights, fp32 main weights and two Adam
# moments: 5.7 GB at 120 layers) and Megatron keeps every one: ten per run, not flag_groups.sh's 200.
SAVE_INTERVAL=${SAVE_INTERVAL:-$(( TRAIN_ITERS >= 10 ? TRAIN_ITERS / 10 : 1 ))}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
# Groups shared by every run of the study (the data index cache once, in RUN_DIR/data_cache).
prores_dtype_args
prores_perf_args "$TP"
prores_data_args "$NAME"
prores_profile_args

prores_llama_args 512 1368 8 1024
TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE:-8}" --global-batch-size "${GLOBAL_BATCH_SIZE:-512}"
    --train-iters "$TRAIN_ITERS" --seed "${SEED:-1234}"
    --lr "${LR:-2e-3}" --min-lr 0 --lr-warmup-iters "$LR_WARMUP_ITERS"
    --lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters "$LR_DECAY_ITERS"
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0
)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")

# run_one L VARIANT: this configuration's flags, then its dry run or launch in a subshell (both
# exec, launch_lib.sh); returns the subshell's status.
run_one() {
    local L=$1 variant=$2 T prores label
    T=$(awk -v t="$(paper_warmup_per_layer "$L")" -v n="$TRAIN_ITERS" -v p="$PAPER_STEPS" \
        'BEGIN { printf "%.10g", t * n / p }')
    if [[ "$variant" == prores ]]; then
        prores=(--prores-schedule linear --prores-warmup-steps "$T")
    else
        prores=(--prores-schedule none)
    fi
    label="L${L}_${variant}"
    RUN_DIR=$STUDY_DIR/$label CHECKPOINT_PATH=$STUDY_DIR/$label/checkpoints
    TENSORBOARD_LOGS_PATH=$STUDY_DIR/$label/tensorboard
    prores_lifetime_args                       # --save/--load and nonpersistent saves of this run
    prores_logging_args "depth_study_$label"   # its TensorBoard, W&B name, monitor (in --save)
    RUN_DIR=$STUDY_DIR                         # prores_launch: the shared data cache and profiles
    ALL_ARGS=(
        --num-layers "$L" "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}"
        "${DTYPE_ARGS[@]}" "${PERF_ARGS[@]}" "${DATA_ARGS[@]}" "${LIFETIME_ARGS[@]}" "${LOGGING_ARGS[@]}"
        "${PROFILE_ARGS[@]}" --prores-init "${PRORES_INIT:-plain}"
        --eval-iters 20  # after the logging group's 10 (last wins): the paper scores 10 M held-out tokens
        "${prores[@]}" "${EXTRA[@]}"
    )
    local tracker="$CHECKPOINT_PATH/latest_checkpointed_iteration.txt"
    if [[ "${DRY_RUN:-0}" != 1 && -f "$tracker" && "$(cat "$tracker")" == "$TRAIN_ITERS" ]]; then
        echo "== $label: done ($TRAIN_ITERS steps in $CHECKPOINT_PATH), skipped" >&2
        return 0
    fi
    echo "== $label: $L layers, ${prores[*]}, $TRAIN_ITERS steps (budget $BUDGET)" >&2
    ( prores_launch "$NAME" )
}

failed=()
total=0
for L in "${DEPTH_LIST[@]}"; do
    for variant in "${VARIANT_LIST[@]}"; do
        total=$((total + 1))
        if ! run_one "$L" "$variant"; then
            failed+=("L${L}_${variant}")
            [[ "${DRY_RUN:-0}" == 1 ]] || refuse "L${L}_${variant} failed; the runs after it did not start"
        fi
    done
done
if (( ${#failed[@]} )); then
    refuse "dry run: ${#failed[@]} of $total configurations refused: ${failed[*]}"
fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "$NAME: dry run: all $total configurations pass ($TRAIN_ITERS steps, budget $BUDGET)" >&2
else
    echo "$NAME: $total runs done in $STUDY_DIR; draw Figure 1: RUN_DIR=$STUDY_DIR bash $0 --analyze" >&2
fi

#!/usr/bin/env bash
# Check patches/ against a Megatron-LM checkout on CPU: apply the patch to a scratch copy, train the
# patched pretrain_gpt.py a few iterations (gloo) and require the same loss, bit for bit, at every
# iteration as `python -m prores_megatron.training.pretrain_gpt` with the same flags, and a different one
# with --prores-schedule none (ProRes is really on); and, ProRes being opt-in, that the patched script
# without any --prores-* flag gives bit for bit the losses of the unpatched script (stock Megatron-LM)
# and of the entry point without --prores-* flags. Usage:
#   bash tools/check_megatron_patch.sh /path/to/Megatron-LM      (branch core_r0.19.0)
#   PP=2 ... runs the pipeline-parallel variant; EXTRA_ARGS adds flags to both runs.
# The checkout is never modified. Its megatron/ comes first on sys.path (as for its users), and this
# repository's prores_megatron (its working tree, not an installed copy) comes next; when it
# has no compiled dataset helpers (`make -C megatron/core/datasets` needs pybind11), the installed
# megatron-core wheel's prebuilt helpers_cpp is copied into the scratch copy (same release).
set -euo pipefail
MLM=${1:?usage: check_megatron_patch.sh MEGATRON_LM_DIR}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then source "$ROOT/tools/setup_env.sh"; PYTHON="$PRORES_PY"; fi
PATCH="$ROOT/patches/megatron-lm-core_r0.19.0-pretrain_gpt-prores.patch"
PP=${PP:-1}
ITERS=${ITERS:-4}
SCRATCH="$(mktemp -d /tmp/prores-mlm-check.XXXXXX)"
trap 'rm -rf "$SCRATCH"' EXIT

if git -C "$MLM" rev-parse --git-dir >/dev/null 2>&1; then
    echo "checkout: $MLM at $(git -C "$MLM" rev-parse HEAD) ($(git -C "$MLM" rev-parse --abbrev-ref HEAD))"
    git -C "$MLM" archive HEAD | tar -x -C "$SCRATCH"
else
    cp -a "$MLM/." "$SCRATCH/"
fi
cp -a "$SCRATCH" "$SCRATCH.stock"  # the unpatched copy, for the stock comparison
trap 'rm -rf "$SCRATCH" "$SCRATCH.stock"' EXIT
cd "$SCRATCH"
git apply --check "$PATCH"
patch -p1 --dry-run --quiet < "$PATCH" >/dev/null
git apply "$PATCH"
echo "patch applies cleanly (git apply --check, patch -p1 --dry-run) and is applied in $SCRATCH"
if ! ls megatron/core/datasets/helpers_cpp*.so >/dev/null 2>&1; then
    # From / so that `import megatron` finds the installed wheel, not this copy.
    wheel_helpers=$(cd / && "$PYTHON" -W ignore -c 'import glob, os, megatron.core.datasets as d
print(*glob.glob(os.path.join(os.path.dirname(d.__file__), "helpers_cpp*.so"))[:1])' 2>/dev/null)
    [[ -n "$wheel_helpers" ]] || { echo "FAIL: no compiled dataset helpers in the checkout or the wheel" >&2; exit 1; }
    cp "$wheel_helpers" megatron/core/datasets/
    cp "$wheel_helpers" "$SCRATCH.stock/megatron/core/datasets/"
fi

FLAGS=(
    --num-layers 8 --hidden-size 64 --ffn-hidden-size 172 --num-attention-heads 4
    --group-query-attention --num-query-groups 2 --seq-length 64 --max-position-embeddings 64
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0
    --init-method-std 0.02 --micro-batch-size 2 --global-batch-size 8 --train-iters "$ITERS"
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.1
    --clip-grad 1.0 --seed 1234 --pipeline-model-parallel-size "$PP"
    --distributed-backend gloo --transformer-impl local --use-cpu-initialization
    --no-rope-fusion --no-persist-layer-norm --no-gradient-accumulation-fusion
    --no-bias-swiglu-fusion --no-bias-dropout-fusion --no-masked-softmax-fusion
    --mock-data --tokenizer-type NullTokenizer --vocab-size 511 --split 949,50,1
    --log-interval 1 --eval-interval 1000 --eval-iters 1
)
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
# PRORES_CPU_SHIM=1: the patched script installs the CPU shim only when asked. PYTHONPATH: this
# checkout's prores_megatron, uncommitted edits included, whatever copy is installed.
export OMP_NUM_THREADS=1 CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1 PRORES_CPU_SHIM=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
used=$(cd "$SCRATCH" && "$PYTHON" -W ignore -c 'import prores_megatron, os; print(os.path.dirname(os.path.dirname(os.path.realpath(prores_megatron.__file__))))')
[[ "$used" == "$(cd "$ROOT" && pwd -P)" ]] || { echo "FAIL: the runs would import prores_megatron from $used, not $ROOT" >&2; exit 1; }
echo "prores_megatron under test: $ROOT (working tree)"
launch() {  # launch NAME ENTRY... -- FLAGS...: train, keep the log, print the per-iteration losses
    local name=$1; shift
    local entry=()
    while [[ "$1" != "--" ]]; do entry+=("$1"); shift; done; shift
    local port=$((20000 + RANDOM % 20000))
    if ! "$PYTHON" -m torch.distributed.run --nproc_per_node "$PP" --nnodes 1 --node_rank 0 \
            --master_addr 127.0.0.1 --master_port "$port" "${entry[@]}" "$@" > "$SCRATCH/$name.log" 2>&1; then
        tail -30 "$SCRATCH/$name.log" >&2
        echo "FAIL: $name did not train" >&2
        exit 1
    fi
    grep -o 'iteration *[0-9]*/ *[0-9]* .*lm loss: [0-9.E+-]*' "$SCRATCH/$name.log" | sed -E 's/.*iteration *([0-9]+)\/.*lm loss: ([0-9.E+-]+)/\1 \2/'
}
PRORES=(--prores-schedule linear --prores-warmup-steps 1)
patched=$(launch patched pretrain_gpt.py -- "${FLAGS[@]}" "${PRORES[@]}" "${EXTRA[@]}")
entry=$(cd "$ROOT" && launch entry -m prores_megatron.training.pretrain_gpt -- "${FLAGS[@]}" "${PRORES[@]}" "${EXTRA[@]}")
plain=$(launch plain pretrain_gpt.py -- "${FLAGS[@]}" --prores-schedule none "${EXTRA[@]}")
# ProRes off: the patched script, the unpatched one (stock Megatron-LM, which installs no CPU shim:
# it runs through a one-line wrapper that installs it first) and the entry point, all without --prores-*.
off_patched=$(launch off_patched pretrain_gpt.py -- "${FLAGS[@]}" "${EXTRA[@]}")
cat > "$SCRATCH.stock/stock_on_cpu.py" <<'PY'
import runpy, sys
from prores_megatron.training import install_cpu_shim
install_cpu_shim()
sys.argv[0] = "pretrain_gpt.py"
runpy.run_path("pretrain_gpt.py", run_name="__main__")
PY
off_stock=$(cd "$SCRATCH.stock" && launch off_stock stock_on_cpu.py -- "${FLAGS[@]}" "${EXTRA[@]}")
off_entry=$(cd "$ROOT" && launch off_entry -m prores_megatron.training.pretrain_gpt -- "${FLAGS[@]}" "${EXTRA[@]}")
grep -q "ProRes: " "$SCRATCH/patched.log" || { echo "FAIL: the patched script did not log its ProRes settings" >&2; exit 1; }
echo "iteration / lm loss  patched Megatron-LM | prores_megatron.training.pretrain_gpt | patched, --prores-schedule none"
paste <(echo "$patched") <(echo "$entry" | cut -d' ' -f2) <(echo "$plain" | cut -d' ' -f2)
[[ $(echo "$patched" | wc -l) -eq $ITERS ]] || { echo "FAIL: expected $ITERS logged iterations" >&2; exit 1; }
[[ "$patched" == "$entry" ]] || { echo "FAIL: the patched script and the entry point disagree" >&2; exit 1; }
[[ "$patched" != "$plain" ]] || { echo "FAIL: --prores-schedule none gives the same losses" >&2; exit 1; }
echo "iteration / lm loss without --prores-* flags: unpatched Megatron-LM | patched | entry point"
paste <(echo "$off_stock") <(echo "$off_patched" | cut -d' ' -f2) <(echo "$off_entry" | cut -d' ' -f2)
[[ $(echo "$off_stock" | wc -l) -eq $ITERS ]] || { echo "FAIL: expected $ITERS logged stock iterations" >&2; exit 1; }
[[ "$off_patched" == "$off_stock" ]] || { echo "FAIL: the patched script without --prores-* flags is not stock" >&2; exit 1; }
[[ "$off_entry" == "$off_stock" ]] || { echo "FAIL: the entry point without --prores-* flags is not stock" >&2; exit 1; }
! grep -q "\[ProRes\]" "$SCRATCH/off_patched.log" || { echo "FAIL: ProRes logged alpha while off" >&2; exit 1; }
echo "PASS: patched Megatron-LM pretrain_gpt.py trains on CPU (PP=$PP) with ProRes, identical to the entry point; without --prores-* flags the patched script and the entry point are bit-identical to unpatched Megatron-LM"

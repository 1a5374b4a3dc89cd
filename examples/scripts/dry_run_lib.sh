# Sourced by the launch scripts. `prores_dry_run [--dry-run-* flags] -- <Megatron-LM + ProRes flags>`
# replaces the shell with `python -m prores_megatron.training.dry_run` for this node's torchrun geometry
# (NNODES, GPUS_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT must be set) plus the user's
# DRY_RUN_ARGS (e.g. --json). It never returns. Interpreter: $PYTHON, else the project environment
# (built if missing: the CPU scripts; the GPU scripts set PYTHON first, launch_lib.sh). The
# launcher it reports is `[LAUNCH_PREFIX] $PYTHON -m torch.distributed.run`, what the scripts execute, and
# OUTER_LAUNCHER (srun) when set.
prores_dry_run() {
    local dry=() user=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do dry+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift  # the "--"
    if [[ -z "${PYTHON:-}" ]]; then
        source "$ROOT/tools/setup_env.sh"
        PYTHON="$PRORES_PY"
    fi
    read -r -a user <<< "${DRY_RUN_ARGS:-}"
    cd "$ROOT"  # so `-m prores_megatron` resolves even with an interpreter that lacks the package
    exec "$PYTHON" -m prores_megatron.training.dry_run \
        --dry-run-nnodes "$NNODES" --dry-run-nproc-per-node "$GPUS_PER_NODE" \
        --dry-run-node-rank "$NODE_RANK" --dry-run-master-addr "${MASTER_ADDR:-}" \
        --dry-run-master-port "$MASTER_PORT" \
        --dry-run-launcher "$(printf '%q ' "${LAUNCH_PREFIX[@]}" "$PYTHON" -m torch.distributed.run)" \
        --dry-run-outer-launcher "${OUTER_LAUNCHER:-}" "${dry[@]}" "${user[@]}" "$@"
}

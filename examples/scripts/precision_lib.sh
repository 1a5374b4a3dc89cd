# Sourced by the GPU launch scripts: DTYPE_ARGS from FP8_RECIPE, one definition for every shape.
#   FP8_RECIPE=tensorwise (default)  bf16 + FP8 hybrid (E4M3 forward, E5M2 gradients), TE current scaling
#   FP8_RECIPE=delayed               bf16 + FP8 hybrid, TE delayed scaling (amax history 1024, max)
#   FP8_RECIPE=none                  bf16 only
# Why tensorwise is the default with ProRes: delayed scaling quantizes each step's gradients with a
# scale from earlier steps' amax; a branch switching on from alpha = 0 (amax 0, scale left at 1.0)
# flushes its first nonzero gradients to zero, and a ramping alpha outgrows the history for the
# following steps (docs/benchmarks.md §3 measures it). Current scaling has neither problem and needs
# Transformer Engine >= 2.2.
prores_dtype_args() {
    case "${FP8_RECIPE:-tensorwise}" in
        tensorwise) DTYPE_ARGS=(--bf16 --fp8-format hybrid --fp8-recipe tensorwise) ;;
        delayed) DTYPE_ARGS=(--bf16 --fp8-format hybrid --fp8-recipe delayed
                             --fp8-amax-history-len 1024 --fp8-amax-compute-algo max) ;;
        none) DTYPE_ARGS=(--bf16) ;;
        *) echo "FP8_RECIPE=${FP8_RECIPE}: choose tensorwise, delayed or none" >&2
           return 2 ;;
    esac
}

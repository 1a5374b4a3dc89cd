"""The Megatron-LM flags that decide which global decoder layers each pipeline stage builds.

Contract: ``PIPELINE_FLAGS`` names them, in the order error messages list them; the coverage guard
(``core.stepping``) and the layout checks (``training.pipeline_layout``) both cite this one list.
"""

PIPELINE_FLAGS = (
    "--num-layers", "--pipeline-model-parallel-size", "--decoder-first-pipeline-num-layers",
    "--decoder-last-pipeline-num-layers", "--num-layers-per-virtual-pipeline-stage",
    "--num-virtual-stages-per-pipeline-rank", "--pipeline-model-parallel-layout",
    "--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split",
)

"""``ProResLayerSpec``: the callable ``cfg.model.transformer_layer_spec`` of a Bridge run with ProRes.

Contract: ``ProResLayerSpec(schedule, warmup_steps, arch)(model_cfg, vp_stage=None)`` returns the
spec Bridge itself would build for ``model_cfg`` (``compat.stock_layer_spec``: local or TE,
MoE, ... from the config), transformed by core's ``with_prores``: the stock spec plus alpha, fresh
for every call (every virtual-pipeline chunk). It is a plain dataclass of its settings, so it
pickles, deep-copies and serialises: ``to_cfg_dict()`` is the mapping Bridge's YAML writer stores
(``_target_`` this class), and Bridge's loader re-creates it from ``run_config.yaml`` once our
prefix is on its allow-list (``prores_megatron.bridge`` registers it on import; without that
import the loader refuses the ``_target_``, loudly). Bridge's newer ``GPTModelConfig`` drops
callables when it serialises; ``checkpoint_metadata`` covers that path.
"""

from dataclasses import asdict, dataclass
from typing import Optional

from ..core.layer_spec import with_prores
from .compat import stock_layer_spec, transformer_config


@dataclass
class ProResLayerSpec:
    schedule: str = "linear"
    warmup_steps: Optional[float] = None
    arch: str = "pre"

    def __call__(self, model_cfg, vp_stage=None):
        stock = stock_layer_spec(model_cfg, vp_stage)
        return with_prores(stock, self.schedule, self.warmup_steps, arch=self.arch,
                           config=transformer_config(model_cfg))

    def to_cfg_dict(self) -> dict:
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}", **asdict(self)}

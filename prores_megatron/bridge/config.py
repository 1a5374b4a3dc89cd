"""``ProResConfig``: the ProRes settings of a Megatron-Bridge run, validated like the ``--prores-*`` flags.

Contract: each field is the Megatron-LM flag without its ``--prores-`` prefix (``warmup_steps`` is
``--prores-warmup-steps``; docs/usage.md, "Training with ProRes", has their meaning). ``finalize(model_cfg,
train_iters=None)`` validates them against the model exactly as ``validate_prores_args`` does for
Megatron-LM (the same checks and messages, naming the flag), converts ``total_warmup_steps`` to a
per-layer T and canonicalises the schedule name; it returns the ``argparse.Namespace`` the shared
Megatron-LM helpers (``TrainingMonitor``) read. ``as_dict()`` / ``from_dict()`` are the form stored in
the checkpoint's metadata (``checkpoint_metadata``).
"""

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..core.architectures import check_arch
from ..core.init_schemes import check_init
from ..training.arguments import ProResArgumentError, add_prores_args, validate_prores_args
from .compat import transformer_config


def _flag_defaults() -> dict:
    """The ``--prores-*`` defaults, from the Megatron-LM parser itself (one source of truth)."""
    parsed = add_prores_args(argparse.ArgumentParser()).parse_args([])
    return {k.removeprefix("prores_"): v for k, v in vars(parsed).items() if k.startswith("prores_")}


@dataclass
class ProResConfig:
    schedule: str = "linear"
    warmup_steps: Optional[float] = None
    total_warmup_steps: Optional[float] = None
    start_step: int = 0
    arch: str = "pre"
    init: str = "megatron"
    monitor_interval: int = 0
    monitor_file: Optional[str] = None
    spike_window: Optional[int] = None  # None: the Megatron-LM flag's default
    spike_threshold: Optional[float] = None
    spike_min_history: Optional[int] = None
    rewarm_pretrained: bool = False  # --prores-rewarm-pretrained: fine-tune with a time-dependent schedule
    trust_checkpoint: bool = False  # --prores-trust-checkpoint: load without the pickle allow-list

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "the ProRes settings") -> "ProResConfig":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ProResArgumentError(f"{where}: unknown ProRes setting(s) {', '.join(unknown)}; "
                                      f"valid: {', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**data)

    def as_args(self, model_cfg, train_iters=None) -> argparse.Namespace:
        """The Megatron-LM ``args`` these settings and the model amount to (not validated)."""
        tc = transformer_config(model_cfg)
        values = _flag_defaults()
        values.update({k: v for k, v in self.as_dict().items() if v is not None})
        args = argparse.Namespace(**{f"prores_{k}": v for k, v in values.items()})
        for name in ("num_layers", "transformer_impl", "sequence_parallel", "multi_latent_attention",
                     "mtp_num_layers", "cuda_graph_impl", "init_method_std", "num_moe_experts"):
            setattr(args, name, getattr(tc, name, None))
        args.num_experts = args.num_moe_experts
        args.train_iters = train_iters
        return args

    def finalize(self, model_cfg, train_iters=None) -> argparse.Namespace:
        """Validate (raises ``ProResArgumentError`` naming the flag); T per layer from here on."""
        args = self.as_args(model_cfg, train_iters)
        for flag, check, value in (("--prores-arch", check_arch, args.prores_arch),
                                   ("--prores-init", check_init, args.prores_init)):
            try:
                check(value)
            except ValueError as err:
                raise ProResArgumentError(f"ProResConfig ({flag}): {err}") from None
        validate_prores_args(args)
        self.schedule = args.prores_schedule
        self.warmup_steps = args.prores_warmup_steps
        self.total_warmup_steps = None
        return args

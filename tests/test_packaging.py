"""Installing the package never pulls a torch: in an NGC container it must keep the container's."""

import re
from importlib.metadata import entry_points, requires


def test_no_torch_requirement():
    reqs = requires("prores-megatron") or []
    names = {re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0].lower() for r in reqs}
    assert "torch" not in names, reqs
    assert any(r.startswith("megatron-core") for r in reqs)


def test_console_commands_point_at_real_functions():
    import importlib

    eps = [ep for ep in entry_points(group="console_scripts") if ep.value.startswith("prores_megatron")]
    assert {ep.name for ep in eps} >= {"prores-megatron", "prores-megatron-pretrain", "prores-megatron-convert-to-hf",
                                       "prores-megatron-train-tokenizer", "prores-megatron-preprocess-data"}
    for ep in eps:
        module, func = ep.value.split(":")
        assert callable(getattr(importlib.import_module(module), func)), ep.value

"""Installing the package never pulls torch or megatron-core: in an NGC/NeMo container or next to a
Megatron-LM checkout it must keep what is there (docs/megatron.md §1); a megatron-core outside the
supported range is refused by name when the Megatron-dependent parts import."""

import os
import re
import subprocess
import sys
from importlib.metadata import entry_points, requires


def test_no_torch_or_megatron_core_requirement_by_default():
    reqs = requires("prores-megatron") or []
    base = [r for r in reqs if "extra ==" not in r]
    names = {re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0].lower() for r in base}
    assert not names & {"torch", "megatron-core", "megatron_core"}, base
    # The fresh-environment path: the [megatron] extra pins the supported range.
    assert any(r.startswith("megatron-core") and ">=0.19.0" in r and "<0.20" in r and 'extra == "megatron"' in r
               for r in reqs), reqs


def _import_compat_with(tmp_path, version):
    """Import prores_megatron.core.compat in a fresh interpreter whose ``megatron`` package is a fake
    one reporting ``version`` (package_info.__version__), first on sys.path."""
    core = tmp_path / version / "megatron" / "core"
    core.mkdir(parents=True)
    (core.parent / "__init__.py").write_text("")
    (core / "__init__.py").write_text("")
    (core / "package_info.py").write_text(f"__version__ = {version!r}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / version), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", "import prores_megatron.core.compat"], env=env,
                          capture_output=True, text=True, timeout=120)


def test_unsupported_megatron_core_is_refused_at_import(tmp_path):
    for version in ("0.18.0", "0.20.0rc0", "0.18.9"):
        proc = _import_compat_with(tmp_path, version)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert (f"supports megatron-core >=0.19.0,<0.20, but the megatron-core imported here is {version}"
                in proc.stderr), proc.stderr[-2000:]
    # 0.19.1 (Megatron-LM's core_r0.19.0 branch, the patch's target) and 0.19.3 pass the check and go on
    # to import the (fake, empty) megatron.core's modules.
    for version in ("0.19.1", "0.19.3"):
        proc = _import_compat_with(tmp_path, version)
        assert "supports megatron-core" not in proc.stderr and "parallel_state" in proc.stderr, proc.stderr[-2000:]


def test_import_prores_megatron_loads_neither_torch_nor_megatron():
    code = ("import sys, prores_megatron, prores_megatron.training, prores_megatron.core; "
            "print(sorted(m for m in ('torch', 'megatron', 'megatron.core') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_console_commands_point_at_real_functions():
    import importlib

    eps = [ep for ep in entry_points(group="console_scripts") if ep.value.startswith("prores_megatron")]
    assert {ep.name for ep in eps} >= {"prores-megatron", "prores-megatron-pretrain", "prores-megatron-convert-to-hf",
                                       "prores-megatron-train-tokenizer", "prores-megatron-preprocess-data"}
    for ep in eps:
        module, func = ep.value.split(":")
        assert callable(getattr(importlib.import_module(module), func)), ep.value

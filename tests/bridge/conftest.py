"""tests/bridge runs against Megatron-Bridge's real modules, loaded by ``bridge_env.load_bridge``
(what imports on CPU and why); without megatron-bridge installed the directory is skipped."""

import pytest
from bridge_env import load_bridge

_SKIP = load_bridge()


def pytest_collection_modifyitems(config, items):
    if _SKIP:
        for item in items:
            if "tests/bridge/" in str(item.fspath).replace("\\", "/"):
                item.add_marker(pytest.mark.skip(reason=_SKIP))

"""Shared fixtures: a world-size-1 gloo group with megatron-core model parallelism initialised."""

import os

import pytest
import torch


@pytest.fixture(scope="session")
def mcore_world1():
    """Initialise torch.distributed (gloo, world 1) and megatron-core's parallel state once."""
    from megatron.core import parallel_state

    from prores_megatron.analysis.model_from_checkpoint import init_world1

    init_world1("cpu", seed=1234)
    torch.set_num_threads(1)
    yield parallel_state


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Four real Megatron-LM checkpoints (megatron_checkpoints.py), trained once per session."""
    from megatron_checkpoints import train_all

    return train_all(tmp_path_factory.mktemp("megatron_checkpoints"))


@pytest.fixture(scope="session")
def short_demo(tmp_path_factory):
    """The README's main job, shortened: examples/scripts/demo_cpu.sh on a 200-document slice of
    the demo corpus, 4 layers, 6 steps. Returns its DEMO_DIR (one run shared by the tests)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from prores_megatron.data.demo_corpus import fetch_demo_corpus

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("short_demo")
    corpus = Path(fetch_demo_corpus())
    docs = corpus.read_text(encoding="utf-8").splitlines()[:200]
    (out / "slice.jsonl").write_text("\n".join(docs) + "\n", encoding="utf-8")
    assert all("text" in json.loads(d) for d in docs)
    env = dict(os.environ, PYTHON=sys.executable, DEMO_DIR=str(out / "demo"), CORPUS=str(out / "slice.jsonl"),
               TRAIN_ITERS="6", NUM_LAYERS="4", SEQ="32", VOCAB="512", EVAL_INTERVAL="3",
               MONITOR_INTERVAL="2", WARMUP_T="1")
    proc = subprocess.run(["bash", str(root / "examples" / "scripts" / "demo_cpu.sh")], env=env,
                          capture_output=True, text=True, timeout=900)
    (out / "demo.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return out / "demo"


@pytest.fixture(scope="session")
def demo_export(short_demo):
    """The shortened demo's Hugging Face export of its ProRes model."""
    return short_demo / "hf"


@pytest.fixture
def fake_te(monkeypatch):
    """megatron-core's real TE spec builder, run against the stand-in provider."""
    from megatron.core.models.gpt import gpt_layer_specs

    from prores_megatron.core import compat

    from models import FakeTESpecProvider

    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", FakeTESpecProvider)
    monkeypatch.setattr(compat, "have_transformer_engine", lambda: True)
    real_backend_for = compat.backend_for
    monkeypatch.setattr(
        compat, "backend_for",
        lambda impl: FakeTESpecProvider() if impl == "transformer_engine" else real_backend_for(impl),
    )

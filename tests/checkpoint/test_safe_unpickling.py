"""A crafted checkpoint runs no code: every unpickling of checkpoint files goes through an allow-list.

Real Megatron-LM checkpoints (megatron_checkpoints.py) are copied and given a payload whose
``__reduce__`` would create a marker file (``os.system``, ``subprocess.Popen``, ``builtins.eval``,
``builtins.exec``), either as DCP's ``.metadata`` pickle or as the torch_dist common state. A
control shows each payload is live (plain ``pickle.loads`` creates the marker); then every entry point
that reads a checkpoint (``open_checkpoint``, the HF export and its CLI, ``prores-megatron cosine``,
the analysis model loader over megatron-core's own loader, the resume check) must refuse it, naming the
refused global and the file, and leave no marker. Untouched checkpoints still read the same tensors as
DCP's stock loader.
"""

import builtins
import io
import os
import pickle
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_checkpoints import MID, copy_checkpoint, it_dir


def payload(kind, marker):
    """An object whose unpickling would create ``marker``, through global ``kind``."""
    command = f"touch {shlex.quote(str(marker))}"
    reducers = {
        "os.system": (os.system, (command,)),
        "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],)),
        "builtins.eval": (builtins.eval, (f"__import__('os').system({command!r})",)),
        "builtins.exec": (builtins.exec, (f"import os; os.system({command!r})",)),
    }

    class Payload:
        def __reduce__(self):
            return reducers[kind]

    return Payload()


# How each payload's global is spelled in the pickle (os.system is posix.system on Linux).
PICKLED_AS = {"os.system": f"{os.system.__module__}.system", "subprocess.Popen": "subprocess.Popen",
              "builtins.eval": "builtins.eval", "builtins.exec": "builtins.exec"}


def save_copy(runs, tmp_path):
    """A copy of checkpoint A's iteration MID in a save directory of its own (tracker included)."""
    ckpt = copy_checkpoint(runs, tmp_path, "A", "torch_dist")
    (ckpt.parent / "latest_checkpointed_iteration.txt").write_text(str(MID))
    return ckpt


def plain_metadata(ckpt):
    with open(ckpt / ".metadata", "rb") as f:
        return pickle.load(f)  # our own freshly trained checkpoint: trusted


def poison_metadata(ckpt, marker, kind="os.system"):
    """The real Metadata, with the payload tucked in after everything DCP needs (so the allowed
    classes are built first and the payload's global comes last)."""
    md = plain_metadata(ckpt)
    md.storage_meta.modules = ["model", payload(kind, marker)]
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return ckpt


def poison_common_state(ckpt, marker):
    """The common state (args, iteration: a torch.save'd list) replaced by the payload, appended to
    its .distcp file; the metadata is repointed at it."""
    md = plain_metadata(ckpt)
    (index,) = [k for k in md.storage_data if k.fqn.startswith("common_state")]
    info = md.storage_data[index]
    buffer = io.BytesIO()
    torch.save([payload("os.system", marker)], buffer)
    file = ckpt / info.relative_path
    info.offset, info.length = file.stat().st_size, len(buffer.getvalue())
    with open(file, "ab") as f:
        f.write(buffer.getvalue())
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return ckpt, file


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "marker"
    yield path
    assert not path.exists(), "a checkpoint's pickle ran code"


@pytest.mark.parametrize("kind", list(PICKLED_AS))
def test_payloads_are_live(kind, tmp_path):
    """Control: with plain pickle each payload does create the marker, so the refusals below mean something."""
    live = tmp_path / "live"
    proc = pickle.loads(pickle.dumps(payload(kind, live)))
    if isinstance(proc, subprocess.Popen):
        proc.wait()
    assert live.exists()


@pytest.mark.parametrize("kind", list(PICKLED_AS))
def test_open_checkpoint_refuses_a_crafted_metadata(runs, tmp_path, marker, kind):
    from prores_megatron.checkpoint import CheckpointError, UnsafePickleError, open_checkpoint

    ckpt = poison_metadata(save_copy(runs, tmp_path), marker, kind)
    with pytest.raises(UnsafePickleError) as err:
        open_checkpoint(ckpt.parent)
    assert isinstance(err.value, CheckpointError)
    assert str(ckpt / ".metadata") in str(err.value) and PICKLED_AS[kind] in str(err.value)


def test_open_checkpoint_refuses_a_crafted_common_state(runs, tmp_path, marker):
    from prores_megatron.checkpoint import UnsafePickleError, open_checkpoint

    ckpt, file = poison_common_state(save_copy(runs, tmp_path), marker)
    with pytest.raises(UnsafePickleError, match="posix.system|os.system") as err:
        open_checkpoint(ckpt)
    assert str(file) in str(err.value) and "common state" in str(err.value)


# ---- every other entry point -----------------------------------------------------------------


def via_export(ckpt, tmp_path, capsys):
    from prores_megatron.checkpoint import UnsafePickleError
    from prores_megatron.export import export_to_hf

    with pytest.raises(UnsafePickleError) as err:
        export_to_hf(ckpt, tmp_path / "hf", dtype="float32", log=lambda m: None)
    assert not (tmp_path / "hf").exists()
    return str(err.value)


def via_convert_cli(ckpt, tmp_path, capsys):
    from prores_megatron.export.convert_to_hf import main

    assert main([str(ckpt), str(tmp_path / "hf_cli"), "--dtype", "float32", "--quiet"]) == 2
    assert not (tmp_path / "hf_cli").exists()
    return capsys.readouterr().err


def via_cosine_cli(ckpt, tmp_path, capsys):
    from prores_megatron.analysis.cli import main

    assert main(["cosine", "--checkpoints", str(ckpt.parent), "--out", str(tmp_path / "cos"), "--device", "cpu"]) == 2
    assert not (tmp_path / "cos").exists()
    return capsys.readouterr().err


def via_load_weights(ckpt, tmp_path, capsys, runs=None):
    """megatron-core's own dist_checkpointing loader, as the cosine command runs it on each checkpoint."""
    from prores_megatron.analysis.model_from_checkpoint import build_model, load_weights
    from prores_megatron.checkpoint import UnsafePickleError, open_checkpoint

    model = build_model(open_checkpoint(it_dir(runs["ckpt"][("A", "torch_dist")], MID)).args, "cpu")
    with pytest.raises(UnsafePickleError) as err:
        load_weights(model, ckpt)
    return str(err.value)


ENTRY_POINTS = {"export_to_hf": via_export, "convert_to_hf": via_convert_cli, "cosine": via_cosine_cli,
                "load_weights": via_load_weights}


@pytest.mark.parametrize("crafted", ["metadata", "common_state"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses(entry, crafted, runs, tmp_path, marker, capsys, request):
    ckpt = save_copy(runs, tmp_path)
    if crafted == "metadata":
        poison_metadata(ckpt, marker)
        file = ckpt / ".metadata"
    else:
        _, file = poison_common_state(ckpt, marker)
    kwargs = {}
    if entry == "load_weights":
        request.getfixturevalue("mcore_world1")
        kwargs["runs"] = runs
    message = ENTRY_POINTS[entry](ckpt, tmp_path, capsys, **kwargs)
    assert "posix.system" in message or "os.system" in message, message
    if entry == "load_weights" and crafted == "common_state":
        assert str(ckpt) in message  # megatron-core's loader does not say which file
    else:
        assert str(file) in message, message


def test_resume_check_reads_nothing_from_a_crafted_checkpoint(runs, tmp_path, marker):
    from prores_megatron.training import resume_check

    def args(ckpt):  # ProRes off, while the checkpoint was trained with linear ProRes
        return SimpleNamespace(load=str(ckpt.parent), ckpt_step=None, num_layers=4, prores_schedule="none",
                               prores_warmup_steps=None, prores_arch="pre", prores_start_step=0, finetune=False)

    assert "--prores-schedule linear -> none" in resume_check.resume_changes(args(save_copy(runs, tmp_path / "real")))
    for name, poison in (("metadata", poison_metadata), ("common", poison_common_state)):
        ckpt = save_copy(runs, tmp_path / name)
        poison(ckpt, marker)
        assert resume_check.resume_changes(args(ckpt)) is None  # refused: treated as nothing to compare with


# ---- real checkpoints still read the same ----------------------------------------------------


@pytest.mark.parametrize("name", ["A", "B"])
def test_real_checkpoints_read_as_with_dcp_itself(runs, name):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    from prores_megatron.checkpoint import load_dcp_metadata, open_checkpoint

    src = it_dir(runs["ckpt"][(name, "torch_dist")], MID)
    ours, stock = load_dcp_metadata(src / ".metadata"), FileSystemReader(str(src)).read_metadata()
    for field in ("state_dict_metadata", "storage_data", "planner_data", "version"):
        assert getattr(ours, field) == getattr(stock, field), field
    assert (ours.storage_meta.checkpoint_id, ours.storage_meta.save_id) == (
        stock.storage_meta.checkpoint_id, stock.storage_meta.save_id)

    ckpt = open_checkpoint(src)
    names = [n for n in ckpt.shapes if n.startswith("decoder.layers.")][:3] + ["embedding.word_embeddings.weight"]
    expected = {n: torch.empty(ckpt.shapes[n][0], dtype=ckpt.shapes[n][1]) for n in names}
    dcp_load(expected, storage_reader=FileSystemReader(str(src)), no_dist=True)  # DCP's own planner and reader
    for n in names:
        got = ckpt.read(n) if not n.startswith("decoder.layers.") else torch.stack(
            [ckpt.read_layer(i, [n])[n] for i in range(ckpt.shapes[n][0][0])])
        assert torch.equal(got, expected[n]), n


def test_legacy_checkpoints_still_open(runs):
    from prores_megatron.checkpoint import open_checkpoint

    for name in ("A", "B"):
        ckpt = open_checkpoint(it_dir(runs["ckpt"][(name, "torch")], MID))
        assert ckpt.iteration == MID and ckpt.args.prores_schedule == "linear"


# ---- the allow-list itself -------------------------------------------------------------------


FORBIDDEN = [("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
             ("builtins", "open"), ("builtins", "setattr"), ("os", "system"), ("posix", "system"),
             ("nt", "system"), ("subprocess", "Popen"), ("subprocess", "run"), ("torch", "load"),
             ("torch", "save"), ("torch.serialization", "load"), ("torch._utils", "_rebuild_tensor_v2"),
             ("pickle", "loads"), ("copyreg", "_reconstructor"), ("functools", "partial"),
             ("importlib", "import_module"), ("runpy", "run_path"), ("collections", "OrderedDict"),
             ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),
             ("torch.distributed.checkpoint.metadata", "torch"), ("this", "s")]


def global_pickle(module, name):
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."


@pytest.mark.parametrize("module,name", FORBIDDEN)
def test_the_unpickler_refuses_by_name_before_importing(module, name):
    from prores_megatron.checkpoint import DCP_METADATA_GLOBALS, RestrictedUnpickler, UnsafePickleError

    assert (module, name) not in DCP_METADATA_GLOBALS
    had = module in sys.modules
    with pytest.raises(UnsafePickleError, match=rf"crafted\.pkl: refusing to unpickle the global {module}\.{name}:"):
        RestrictedUnpickler(io.BytesIO(global_pickle(module, name)), "crafted.pkl").load()
    assert (module in sys.modules) == had  # a refused module is never imported ("this" prints the Zen)


def test_the_allow_list_holds_only_passive_types():
    """Everything allowed is a DCP dataclass or enum, torch.Size, a dtype, or the layout lookup."""
    import dataclasses
    import enum

    from prores_megatron.checkpoint import DCP_METADATA_GLOBALS

    dtypes = {m_n for m_n in DCP_METADATA_GLOBALS if isinstance(getattr(torch, m_n[1], None), torch.dtype)}
    assert {("torch", "float32"), ("torch", "bfloat16"), ("torch", "float16"), ("torch", "int64")} <= dtypes
    others = DCP_METADATA_GLOBALS - dtypes
    for module, name in others:
        obj = getattr(__import__(module, fromlist=[name]), name)
        kind = ("dataclass" if dataclasses.is_dataclass(obj) else "enum" if isinstance(obj, enum.EnumMeta)
                else f"{module}.{name}")
        assert kind in ("dataclass", "enum", "torch.Size", "torch.serialization._get_layout"), kind
        assert module.startswith("torch"), module
    assert len(others) == 17


def test_build_on_an_allowed_class_is_undone_and_refused():
    from torch.distributed.checkpoint.metadata import Metadata

    from prores_megatron.checkpoint import RestrictedUnpickler, UnsafePickleError

    # GLOBAL Metadata; BUILD (None, {"__eq__": 1}): setattr on the class itself.
    data = (b"\x80\x04ctorch.distributed.checkpoint.metadata\nMetadata\nN}X\x06\x00\x00\x00__eq__"
            b"K\x01s\x86b.")
    before = Metadata.__dict__["__eq__"]
    with pytest.raises(UnsafePickleError, match=r"sets attributes of torch\.distributed\.checkpoint\.metadata\.Metadata"):
        RestrictedUnpickler(io.BytesIO(data), "crafted.pkl").load()
    assert Metadata.__dict__["__eq__"] is before


def test_persistent_ids_and_other_pickles_are_refused(tmp_path):
    from prores_megatron.checkpoint import CheckpointError, RestrictedUnpickler, UnsafePickleError, load_dcp_metadata

    with pytest.raises(UnsafePickleError, match="persistent id"):
        RestrictedUnpickler(io.BytesIO(b"\x80\x02X\x01\x00\x00\x00xQ."), "crafted.pkl").load()
    (tmp_path / "list.metadata").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError, match=r"list\.metadata: not DCP checkpoint metadata"):
        load_dcp_metadata(tmp_path / "list.metadata")
    (tmp_path / "cut.metadata").write_bytes(pickle.dumps({"a": 1})[:-3])
    with pytest.raises(CheckpointError, match=r"cut\.metadata: cannot be read"):
        load_dcp_metadata(tmp_path / "cut.metadata")


def test_restricted_dcp_loading_restores_the_process(runs, monkeypatch):
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    from prores_megatron.checkpoint import restricted_dcp_loading

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    real = FileSystemReader.__dict__["read_metadata"]
    with restricted_dcp_loading():
        assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
        common = dist_checkpointing.load_common_state_dict(str(it_dir(runs["ckpt"][("B", "torch_dist")], MID)))
    assert common["iteration"] == MID and common["args"].prores_arch == "lns"
    assert FileSystemReader.__dict__["read_metadata"] is real
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ

"""Reading real Megatron-LM checkpoints (torch_dist and legacy): refusals named before any work, and
torch_dist read one layer at a time without the optimizer (checkpoints: megatron_checkpoints.py)."""

import shutil

import pytest
import torch

from megatron_checkpoints import MID, L, copy_checkpoint, edit_metadata, export, it_dir, refuse, rewrite_legacy_args


def test_refuses_what_is_not_a_megatron_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    refuse(tmp_path / "empty", tmp_path / "o1", "not a Megatron checkpoint")
    refuse(tmp_path / "nowhere", tmp_path / "o2", "no such checkpoint directory")
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("12\n")
    refuse(tmp_path / "save", tmp_path / "o3", "iter_0000012, which does not exist")


def test_refuses_missing_and_truncated_shards(runs, tmp_path):
    ckpt = copy_checkpoint(runs, tmp_path, "A", "torch_dist")
    victim = sorted(ckpt.glob("*.distcp"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    refuse(ckpt, tmp_path / "o1", f"{victim.name}: truncated")
    victim.unlink()
    refuse(ckpt, tmp_path / "o2", f"{victim.name}: missing")
    legacy = copy_checkpoint(runs, tmp_path, "B", "torch")
    shutil.rmtree(legacy / "mp_rank_00_001")
    refuse(legacy, tmp_path / "o3", "mp_rank_00_001")
    legacy2 = copy_checkpoint(runs, tmp_path / "t", "B", "torch")
    rank_file = legacy2 / "mp_rank_00_000" / "model_optim_rng.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:1000])
    refuse(legacy2, tmp_path / "o4", "mp_rank_00_000/model_optim_rng.pt: cannot be read")


def test_refuses_broken_checkpoint_directories(runs, tmp_path):
    (tmp_path / "afile").write_text("x")
    refuse(tmp_path / "afile", tmp_path / "o1", "not a directory")
    save = tmp_path / "save"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("soon")
    refuse(save, tmp_path / "o2", "expected an iteration number or 'release', found 'soon'")
    (save / "latest_checkpointed_iteration.txt").write_text("release")
    (save / "release").mkdir()
    refuse(save, tmp_path / "o3", "neither a torch_dist")

    ckpt = copy_checkpoint(runs, tmp_path / "a", "A", "torch_dist")
    (ckpt / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    refuse(ckpt, tmp_path / "o4", "sharded_backend is 'zarr'")
    ckpt = copy_checkpoint(runs, tmp_path / "b", "A", "torch_dist")
    edit_metadata(ckpt, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("common_state")])
    refuse(ckpt, tmp_path / "o5", "no common state")
    (ckpt / ".metadata").write_bytes((ckpt / ".metadata").read_bytes()[:100])
    refuse(ckpt, tmp_path / "o6", r"\.metadata: cannot be read")

    legacy = copy_checkpoint(runs, tmp_path / "c", "B", "torch")
    for f in legacy.glob("mp_rank_*/model_optim_rng.pt"):
        state = torch.load(f, weights_only=False)
        state["args"] = None
        torch.save(state, f)
    refuse(legacy, tmp_path / "o7", "no saved Megatron arguments")
    legacy = rewrite_legacy_args(copy_checkpoint(runs, tmp_path / "d", "A", "torch"),
                                 lambda a: setattr(a, "num_query_groups", 1))
    refuse(legacy, tmp_path / "o8", "TP=2 > 1 query groups")
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    refuse(it_dir(runs["ckpt"][("A", "torch_dist")], MID), tmp_path / "o9", "not a SentencePiece model",
           tokenizer_model=tmp_path / "bad.model")
    (tmp_path / "o10").write_text("a file")
    with pytest.raises(Exception, match="exists and is not a directory"):
        export(it_dir(runs["ckpt"][("A", "torch_dist")], MID), tmp_path / "o10", force=True)
    assert (tmp_path / "o10").read_text() == "a file"


def test_torch_dist_reads_one_layer_at_a_time_and_never_the_optimizer(runs, tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemReader

    calls = []
    real = FileSystemReader.read_data

    def spy(self, plan, planner):
        calls.append([(item.storage_index.fqn, tuple(item.storage_offsets), tuple(item.storage_index.offset or ()))
                      for item in plan.items])
        return real(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", spy)
    export(it_dir(runs["ckpt"][("A", "torch_dist")], MID), tmp_path / "out")
    assert calls
    read = {fqn for call in calls for fqn, _, _ in call}
    assert not [f for f in read if f.startswith("optimizer") or "_extra_state" in f], read
    layer_calls = [c for c in calls if any(f.startswith("decoder.layers.") for f, _, _ in c)]
    assert len(layer_calls) == L
    for i, call in enumerate(layer_calls):  # every saved chunk read by call i is layer i's
        assert {chunk_offset[0] for _, _, chunk_offset in call} == {i}

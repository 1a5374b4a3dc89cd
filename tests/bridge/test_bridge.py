"""ProRes through Megatron-Bridge 0.6.2's real classes on CPU (conftest.py: what imports here).

- the spec callable, built by megatron-core's ``GPTModelBuilder`` (Bridge's newer GPTModelConfig
  path), gives the model ``with_prores`` gives on the stock local spec;
- ``ProResCallback`` driven through Bridge's ``CallbackManager`` with real ``CallbackContext``s
  sets the alpha buffers to min(t / (T*l), 1) (values written out below) and feeds the monitor;
- Bridge's YAML round trip keeps the spec (dict-serialised configs) or is refused (GPTModelConfig
  drops callables; an unregistered prefix);
- a Bridge-format checkpoint exports to a Llama whose logits match the model's mid-warmup.
"""

import json
import types
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import torch
import yaml

from models import llama_config

pytestmark = pytest.mark.usefixtures("mcore_world1")

T, L = 2, 3
# alpha(l, t) = min(t / (T*l), 1) for T = 2, L = 3, by hand: layer 1 full at t = 2, layer 3 at t = 6.
EXPECTED = {0: [0, 0, 0], 1: [1 / 2, 1 / 4, 1 / 6], 2: [1, 1 / 2, 1 / 3], 3: [1, 3 / 4, 1 / 2],
            4: [1, 1, 2 / 3], 5: [1, 1, 5 / 6], 6: [1, 1, 1]}


def model_config(num_layers=L, **kw):
    from megatron.training.models.gpt import GPTModelConfig

    return GPTModelConfig(transformer=llama_config(num_layers=num_layers, transformer_impl="local"), vocab_size=kw.pop("vocab_size", 64),
                          seq_length=16, position_embedding_type="rope", share_embeddings_and_output_weights=False, **kw)


def build(cfg, seed=0):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.training.models.gpt import GPTModelBuilder

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return GPTModelBuilder(cfg).build_model(ProcessGroupCollection.use_mpu_process_groups())


def alphas(model):
    """Alpha per layer as the model's residual buffers hold it (both branches must agree)."""
    out = []
    for layer in model.decoder.layers:
        values = {float(getattr(layer, f).alpha) for f in ("self_attn_bda", "mlp_bda")}
        assert len(values) == 1, values
        out.append(values.pop())
    return out


def tokens(vocab=64, seq=16):
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))


def forward(model, toks):
    positions = torch.arange(toks.shape[1]).unsqueeze(0).expand_as(toks)
    return model(toks, positions, None)


@pytest.mark.parametrize("arch", ["pre", "sandwich"])  # sandwich: the spec callable must pass arch on
def test_spec_callable_gives_the_with_prores_model(arch):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from prores_megatron.bridge import ProResConfig, ProResLayerSpec, attach_prores
    from prores_megatron.core import set_prores_step, with_prores

    from models import gpt_model

    cfg = model_config()
    attach_prores(cfg, ProResConfig(schedule="linear", warmup_steps=T, arch=arch))
    assert cfg.transformer_layer_spec == ProResLayerSpec("linear", T, arch)
    built = build(cfg)
    torch.manual_seed(0)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    stock = get_gpt_layer_local_spec(normalization="RMSNorm")
    reference = gpt_model(cfg.transformer, with_prores(stock, "linear", T, arch=arch, config=cfg.transformer))
    assert [(n, type(m)) for n, m in built.named_modules()] == [(n, type(m)) for n, m in reference.named_modules()]
    ours, theirs = built.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours if "_extra" not in k)
    for model in (built, reference):
        set_prores_step(model, 3)
        model.eval()
    with torch.no_grad():
        assert torch.equal(forward(built, tokens()), forward(reference, tokens()))


@dataclass
class _TrainState:  # Bridge's TrainState lives in training/state.py, which needs Transformer Engine
    step: int = 0


def bridge_state(cfg):
    try:
        from megatron.bridge.training.state import GlobalState  # imports on a full (GPU) install
    except ImportError:
        return types.SimpleNamespace(train_state=_TrainState(), cfg=types.SimpleNamespace(model=cfg))
    state = GlobalState()
    state.train_state.step = 0
    state._cfg = types.SimpleNamespace(model=cfg)
    return state


def bridge_loop(cfg, args, iters, grad_norm, skip=()):
    """Bridge 0.6.2's train() around ``ProResCallback(args)``, driven through its real CallbackManager
    and CallbackContexts: on_train_start, then per iteration the start event, the step, the end event
    and step += 1; an iteration in ``skip`` is _should_skip_and_handle_iteration's (step += 1, no event).
    Returns the model, the state, ``fire(event)``, the alpha per layer seen at each step's start
    event, the losses and the calls of the finalize function the monitor wraps."""
    from megatron.bridge.training.callbacks import CallbackContext, CallbackManager

    from prores_megatron.bridge import ProResCallback

    model = build(cfg)
    finalized = []
    model.config.finalize_model_grads_func = finalized.append  # Bridge's setup installs its own before train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    manager = CallbackManager()
    manager.add(ProResCallback(args))
    state = bridge_state(cfg)

    def fire(event, **kw):
        manager.fire(event, CallbackContext(state=state, model=[model], user_state=manager.user_state,
                                            optimizer=optimizer, **kw))

    fire("on_train_start")
    seen, losses = {}, []
    toks = tokens()
    while state.train_state.step < iters:
        if state.train_state.step + 1 in skip:
            state.train_state.step += 1
            continue
        fire("on_train_step_start")
        seen[state.train_state.step] = alphas(model)
        optimizer.zero_grad()
        loss = forward(model, toks).float().logsumexp(-1).mean()
        loss.backward()
        model.config.finalize_model_grads_func([model])  # forward_backward_func ends with it; the monitor wraps it
        optimizer.step()
        losses.append(float(loss))
        fire("on_train_step_end", loss_dict={"lm loss": loss.detach()}, grad_norm=grad_norm, skipped_iter=False)
        state.train_state.step += 1
    return types.SimpleNamespace(model=model, state=state, fire=fire, seen=seen, losses=losses, finalized=finalized)


def test_callback_sets_alpha_each_step_through_bridge_callback_manager(tmp_path):
    from prores_megatron.bridge import ProResConfig, attach_prores

    cfg = model_config()
    prores = ProResConfig(schedule="linear", warmup_steps=T, monitor_interval=3,
                          monitor_file=str(tmp_path / "monitor.jsonl"))
    args = attach_prores(cfg, prores, train_iters=7)
    args.save = args.tensorboard_dir = None
    args.use_distributed_optimizer = args.sequence_parallel = False
    run = bridge_loop(cfg, args, 7, grad_norm=1.5)
    seen, losses, finalized, state, model = run.seen, run.losses, run.finalized, run.state, run.model
    for t, want in EXPECTED.items():
        assert seen[t] == pytest.approx(want, abs=1e-7), t
    assert len(finalized) == 7  # the monitor's wrapper calls the finalize function it found
    state.train_state.step = 4  # evaluation after 4 steps uses the alpha of the last one (t = 3)
    run.fire("on_eval_start")
    assert alphas(model) == pytest.approx(EXPECTED[3], abs=1e-7)
    records = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["iteration"] for r in steps] == list(range(1, 8))
    assert [r["lm_loss"] for r in steps] == pytest.approx(losses) and {r["grad_norm"] for r in steps} == {1.5}
    assert records[0]["kind"] == "run" and records[0]["warmup_steps"] == T
    # monitor_interval 3: iterations 3 and 6 (1-based) are measured, i.e. steps t = 2 and 5, and the
    # alpha the monitor saw is what the buffers held during those steps.
    layers = [r for r in records if r["kind"] == "layers"]
    assert [(r["iteration"], r["step"]) for r in layers] == [(3, 2), (6, 5)]
    assert [r["alpha"] for r in layers] == [pytest.approx(EXPECTED[2]), pytest.approx(EXPECTED[5])]
    assert records[-1]["kind"] == "spikes"


def test_callback_refuses_a_model_without_prores():
    from megatron.bridge.training.callbacks import CallbackContext, CallbackManager

    from prores_megatron.bridge import ProResCallback, ProResConfig

    cfg = model_config()  # no attach_prores: Bridge's stock spec
    args = ProResConfig(schedule="linear", warmup_steps=T).finalize(cfg)
    manager = CallbackManager()
    manager.add(ProResCallback(args))
    with pytest.raises(ValueError, match="no ProRes residual scale"):
        manager.fire("on_train_start", CallbackContext(state=bridge_state(cfg), model=[build(cfg)]))


def test_bad_settings_name_the_flag():
    from prores_megatron.bridge import ProResConfig
    from prores_megatron.training import ProResArgumentError

    with pytest.raises(ProResArgumentError, match="--prores-warmup-steps"):
        ProResConfig(schedule="linear").finalize(model_config())
    with pytest.raises(ProResArgumentError, match="--prores-arch"):
        ProResConfig(schedule="linear", warmup_steps=2, arch="bogus").finalize(model_config())


# ---- Bridge's YAML round trip ------------------------------------------------------------------


def containers():
    from megatron.bridge.training.utils.config_utils import _ConfigContainerBase
    from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix

    register_allowed_target_prefix(__name__)  # the test's own containers (trusted code)
    return _ConfigContainerBase


def run_container(name, model_type, **extra_fields):
    """A Bridge config container with a ``model`` field of ``model_type`` (and ``extra_fields``:
    name -> dataclasses.field), importable as ``tests.bridge.test_bridge.<name>`` for the YAML reload."""
    from dataclasses import make_dataclass

    fields = [("model", Optional[model_type], field(default=None))]
    fields += [(k, object, f) for k, f in extra_fields.items()]
    cls = make_dataclass(name, fields, bases=(containers(),), kw_only=True)
    cls.__module__ = __name__
    globals()[name] = cls
    return cls


def roundtrip(container, path):
    container.to_yaml(str(path))
    return type(container).from_yaml(str(path))


@dataclass
class ProviderLike:
    """A dict-serialised model config (what GPTModelProvider, a dataclass, is to Bridge's YAML)."""
    num_layers: int = L
    transformer_layer_spec: Any = None


def test_yaml_roundtrip_keeps_the_spec_or_is_refused(tmp_path):
    from megatron.training.config.instantiate_utils import InstantiationException, target_allowlist

    from prores_megatron.bridge import ProResLayerSpec

    Run = run_container("RunProvider", ProviderLike)
    run = Run(model=ProviderLike(transformer_layer_spec=ProResLayerSpec("linear-sqrt", 5.0, "lns")))
    text_path = tmp_path / "run_config.yaml"
    back = roundtrip(run, text_path)
    assert back.model.transformer_layer_spec == ProResLayerSpec("linear-sqrt", 5.0, "lns")
    assert yaml.safe_load(text_path.read_text())["model"]["transformer_layer_spec"]["_target_"] == (
        "prores_megatron.bridge.layer_spec.ProResLayerSpec")
    target_allowlist.remove_prefix("prores_megatron.bridge.")  # a process that never imported us
    try:
        with pytest.raises(InstantiationException, match="not in the allowlist"):
            type(run).from_yaml(str(text_path))
    finally:
        target_allowlist.add_prefix("prores_megatron.bridge.")


def test_yaml_roundtrip_of_gpt_model_config_refuses_the_lost_spec(tmp_path):
    from megatron.training.models.gpt import GPTModelConfig

    from prores_megatron.bridge import (
        ProResConfig,
        ProResLayerSpec,
        ProResSpecLostError,
        attach_prores,
        check_prores_spec,
        restore_prores_spec,
    )

    Run = run_container("RunGPT", GPTModelConfig)
    cfg = model_config()
    attach_prores(cfg, ProResConfig(schedule="linear", warmup_steps=T, start_step=1))
    back = roundtrip(Run(model=cfg), tmp_path / "run_config.yaml").model
    assert back.transformer_layer_spec is None  # Bridge's serialiser dropped the callable
    with pytest.raises(ProResSpecLostError, match="restore_prores_spec"):
        check_prores_spec(back)
    restored = restore_prores_spec(back)
    assert (restored.schedule, restored.warmup_steps, restored.start_step) == ("linear", T, 1)
    assert back.transformer_layer_spec == ProResLayerSpec("linear", T, "pre")
    assert check_prores_spec(back) is not None
    model = build(back)
    from prores_megatron.core import set_prores_step

    set_prores_step(model, 3)
    assert alphas(model) == pytest.approx(EXPECTED[3], abs=1e-7)


# ---- export of a Bridge-format checkpoint ------------------------------------------------------


def save_bridge_checkpoint(model, cfg, save_dir, iteration):
    """What Bridge 0.6.2's save_checkpoint writes at world size 1 (its module needs modelopt, so
    its steps are replayed here): megatron-core's dist_checkpointing.save of {"checkpoint_version",
    "iteration", "model"}, train_state.pt (TrainState.state_dict()), run_config.yaml by Bridge's
    YAML writer, and the trackers latest_train_state.pt / latest_checkpointed_iteration.txt."""
    import shutil

    from megatron.core import dist_checkpointing
    from megatron.training.models.gpt import GPTModelConfig

    Run = run_container("RunSaved", GPTModelConfig,
                        tokenizer=field(default_factory=lambda: {"tokenizer_type": "NullTokenizer"}))
    it_dir = save_dir / f"iter_{iteration:07d}"
    it_dir.mkdir(parents=True)
    dist_checkpointing.save({"checkpoint_version": 3.0, "iteration": iteration, "model": model.sharded_state_dict()},
                            str(it_dir))
    torch.save({"step": torch.tensor(iteration), "consumed_train_samples": torch.tensor(0)}, it_dir / "train_state.pt")
    shutil.copy(it_dir / "train_state.pt", save_dir / "latest_train_state.pt")
    (save_dir / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    Run(model=cfg).to_yaml(str(it_dir / "run_config.yaml"))
    return it_dir


def test_export_of_a_bridge_checkpoint_matches_the_model_mid_warmup(tmp_path):
    from export.test_hf_export import hf_logits

    from prores_megatron.bridge import ProResConfig, attach_prores
    from prores_megatron.bridge.export import main
    from prores_megatron.core import set_prores_step

    from megatron_checkpoints import TOL

    iteration, vocab = 3, 60  # t = 3: layer 1 at alpha 1, layers 2-3 part-way (EXPECTED[3])
    cfg = model_config(vocab_size=vocab, should_pad_vocab=True, make_vocab_size_divisible_by=16)
    attach_prores(cfg, ProResConfig(schedule="linear", warmup_steps=T))
    model = build(cfg, seed=3)
    assert model.embedding.word_embeddings.weight.shape[0] == 64  # padded: the export drops 4 rows
    save_bridge_checkpoint(model, cfg, tmp_path / "save", iteration)
    out = tmp_path / "hf"
    assert main([str(tmp_path / "save"), str(out), "--dtype", "float32", "--quiet"]) == 0
    provenance = json.loads((out / "prores_export.json").read_text())
    assert provenance["step"] == iteration and provenance["alpha_per_layer"] == pytest.approx(EXPECTED[3])
    model.eval()
    set_prores_step(model, iteration)
    toks = tokens(vocab)
    with torch.no_grad():
        expected = forward(model, toks)[..., :vocab].float()
    got = hf_logits(out, toks)
    diff = (got - expected).abs().max().item()
    print(f"max |logit difference| HF export vs megatron-core: {diff:.3g}")
    assert diff <= TOL


def test_export_refuses_a_megatron_lm_style_directory_without_run_config(tmp_path):
    from prores_megatron.bridge.export import main

    (tmp_path / "iter_0000001").mkdir()
    (tmp_path / "iter_0000001" / ".metadata").write_bytes(b"")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    assert main([str(tmp_path), str(tmp_path / "hf")]) == 2


# ---- the checkpoint manager: Bridge's load under the allow-list, the spec and settings checks -----


class ReplayedLoad:
    """Bridge 0.6.2's DefaultCheckpointManager.load at world size 1, replayed (its module needs
    modelopt): megatron-core's load_common_state_dict, then dist_checkpointing.load of the model's
    sharded state dict, then load_state_dict (_load_global_dist_base_checkpoint, _load_model_state_dict)."""

    checkpointing_context = {"marker": "bridge's"}

    def __init__(self, directory):
        self.directory, self.calls = directory, []

    def load(self, ctx):
        from megatron.core import dist_checkpointing

        self.calls.append("load")
        common = dist_checkpointing.load_common_state_dict(str(self.directory))
        (model,) = ctx.model
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(self.directory))
        model.load_state_dict(loaded["model"], strict=True)
        return common["iteration"], 0

    def save(self, ctx, callback_manager):
        self.calls.append("save")

    def finalize_async_saves(self, state, blocking=False, terminate=False):
        self.calls.append(("finalize", blocking, terminate))


def load_context(cfg, model):
    return types.SimpleNamespace(state=types.SimpleNamespace(cfg=types.SimpleNamespace(model=cfg)), model=[model])


def saved_prores_checkpoint(tmp_path, iteration=3):
    from prores_megatron.bridge import ProResConfig, attach_prores

    cfg = model_config()
    attach_prores(cfg, ProResConfig(schedule="linear", warmup_steps=T))
    model = build(cfg, seed=3)
    it_dir = save_bridge_checkpoint(model, cfg, tmp_path / "save", iteration)
    return cfg, model, it_dir


def test_checkpoint_manager_loads_bridge_checkpoints_under_the_allow_list(tmp_path):
    from checkpoint.test_safe_unpickling import poison_metadata

    from prores_megatron.bridge import ProResCheckpointManager, ProResConfig, attach_prores
    from prores_megatron.checkpoint import UnsafePickleError
    from prores_megatron.core import set_prores_step

    cfg, saved, it_dir = saved_prores_checkpoint(tmp_path)
    checkpoint_config = types.SimpleNamespace(load=str(tmp_path / "save"), pretrained_checkpoint=None, ckpt_step=None)
    fresh = build(cfg, seed=11)
    manager = ProResCheckpointManager(checkpoint_config, inner=ReplayedLoad(it_dir))
    assert manager.checkpointing_context == {"marker": "bridge's"}  # setup() reads Bridge's own context
    assert manager.load(load_context(cfg, fresh)) == (3, 0)
    for model in (saved, fresh):
        model.eval()
        set_prores_step(model, 3)
    with torch.no_grad():
        assert torch.equal(forward(fresh, tokens()), forward(saved, tokens()))  # the real weights came through

    marker = tmp_path / "marker"
    poison_metadata(it_dir, marker)
    with pytest.raises(UnsafePickleError, match="posix.system|os.system") as err:
        manager.load(load_context(cfg, build(cfg)))
    assert str(it_dir / ".metadata") in str(err.value) and not marker.exists()
    assert "--prores-trust-checkpoint" in str(err.value)  # the refusal names the way to load a trusted one
    trusted = model_config()
    attach_prores(trusted, ProResConfig(schedule="linear", warmup_steps=T, trust_checkpoint=True))
    manager.load(load_context(trusted, build(trusted)))  # no allow-list: the payload runs, as the user chose
    assert marker.exists()
    marker.unlink()
    ReplayedLoad(it_dir).load(load_context(cfg, build(cfg)))  # control: Bridge's load steps alone
    assert marker.exists()  # ran the payload
    manager.save(load_context(cfg, fresh), None)
    manager.finalize_async_saves("state", blocking=True)
    assert manager.inner.calls[-2:] == ["save", ("finalize", True, False)]


def test_checkpoint_manager_refuses_a_lost_spec_before_reading_anything(tmp_path):
    from megatron.training.models.gpt import GPTModelConfig

    from prores_megatron.bridge import ProResCheckpointManager, ProResSpecLostError

    cfg, _, it_dir = saved_prores_checkpoint(tmp_path)
    back = roundtrip(run_container("RunLost", GPTModelConfig)(model=cfg), tmp_path / "reloaded.yaml").model
    assert back.transformer_layer_spec is None  # what a reloaded run_config.yaml gives
    inner = ReplayedLoad(it_dir)
    manager = ProResCheckpointManager(types.SimpleNamespace(load=str(tmp_path / "save")), inner=inner)
    vanilla = build(back)  # Bridge built the stock model from the reloaded config
    for call in (lambda: manager.load(load_context(back, vanilla)), lambda: manager.save(load_context(back, vanilla))):
        with pytest.raises(ProResSpecLostError, match="restore_prores_spec"):
            call()
    assert inner.calls == []  # refused before Bridge read or wrote anything


def test_checkpoint_manager_says_how_far_alpha_jumps_when_settings_change(tmp_path, capsys):
    from prores_megatron.bridge import ProResCheckpointManager, ProResConfig, attach_prores

    cfg, _, it_dir = saved_prores_checkpoint(tmp_path)  # linear, T = 2, saved after 3 steps
    save = str(tmp_path / "save")

    def resume(run_cfg, **checkpoint):
        config = types.SimpleNamespace(load=save, pretrained_checkpoint=None, ckpt_step=None, finetune=False)
        vars(config).update(checkpoint)
        ProResCheckpointManager(config, inner=ReplayedLoad(it_dir)).load(load_context(run_cfg, build(run_cfg)))
        return capsys.readouterr().out

    assert "WARNING" not in resume(cfg)  # the same settings: nothing to say
    vanilla = resume(model_config())
    # By hand, at t = 3: the checkpoint's alpha is [1, 3/4, 1/2]; without ProRes every alpha is 1.
    assert "--prores-schedule linear -> none" in vanilla and "layer 3: alpha 0.5 -> 1" in vanilla
    assert str(it_dir) in vanilla and "iteration 3" in vanilla
    other = model_config()
    attach_prores(other, ProResConfig(schedule="linear", warmup_steps=4))
    # T = 4 at t = 3: layer 1 0.75, layer 2 0.375, layer 3 0.25; the largest jump is layer 2 (0.75 -> 0.375).
    text = resume(other)
    assert "--prores-warmup-steps 2 -> 4" in text and "layer 2: alpha 0.75 -> 0.375" in text
    assert "deepest layer 3: alpha 0.5 -> 0.25" in text

    # A finetune from pretrained_checkpoint starts at iteration 0, where alpha(l, 0) = 0: refused before
    # anything is read, naming both ways out; with rewarm_pretrained it goes ahead (alpha 0 under both).
    from prores_megatron.training.arguments import ProResArgumentError

    with pytest.raises(ProResArgumentError, match=r"fine-tuning load .*ProResConfig\(schedule='none'\).*"
                       r"rewarm_pretrained=True.*--prores-rewarm-pretrained"):
        resume(other, load=str(tmp_path / "nothing"), pretrained_checkpoint=save)
    rewarm = model_config()
    attach_prores(rewarm, ProResConfig(schedule="linear", warmup_steps=4, rewarm_pretrained=True))
    finetune = resume(rewarm, load=str(tmp_path / "nothing"), pretrained_checkpoint=save)
    assert "--prores-warmup-steps 2 -> 4" in finetune and "iteration 0" in finetune
    # A release checkpoint (Megatron's tracker says 'release') is loaded at iteration 0 too.
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "latest_checkpointed_iteration.txt").write_text("release")
    with pytest.raises(ProResArgumentError, match="a release checkpoint"):
        resume(other, load=str(tmp_path / "release"))
    static = model_config()
    attach_prores(static, ProResConfig(schedule="none"))
    resume(static, load=str(tmp_path / "nothing"), pretrained_checkpoint=save)  # no warmup to restart


@dataclass
class CheckpointSection:  # the fields of Bridge's CheckpointConfig (its module needs TE) read here
    save: Optional[str] = None
    load: Optional[str] = None
    custom_manager_class: Optional[str] = None


def test_prores_callback_names_the_manager_and_yaml_keeps_it(tmp_path):
    from megatron.training.models.gpt import GPTModelConfig

    from prores_megatron.bridge import ProResConfig, prores_callback
    from prores_megatron.bridge.checkpoint_manager import MANAGER

    Run = run_container("RunWithCheckpoint", GPTModelConfig, checkpoint=field(default_factory=CheckpointSection))
    run = Run(model=model_config())
    prores_callback(run, ProResConfig(schedule="linear", warmup_steps=T))
    assert run.checkpoint.custom_manager_class == MANAGER == (
        "prores_megatron.bridge.checkpoint_manager.ProResCheckpointManager")
    back = roundtrip(run, tmp_path / "run_config.yaml")
    assert back.checkpoint.custom_manager_class == MANAGER  # a string: the reload keeps it
    module, name = MANAGER.rsplit(".", 1)
    import importlib

    assert getattr(importlib.import_module(module), name).__name__ == "ProResCheckpointManager"

    theirs = Run(model=model_config(), checkpoint=CheckpointSection(custom_manager_class="my.Manager"))
    with pytest.warns(UserWarning, match="custom_manager_class is 'my.Manager': kept"):
        prores_callback(theirs, ProResConfig(schedule="linear", warmup_steps=T))
    assert theirs.checkpoint.custom_manager_class == "my.Manager"


def test_checkpoint_manager_has_every_member_of_bridges_protocol():
    """Bridge checks ``isinstance(manager, CheckpointManager)`` (a runtime Protocol) and calls its
    methods by keyword; its module does not import here, so its source is read."""
    import ast
    import importlib.util
    import inspect
    from pathlib import Path

    from prores_megatron.bridge import ProResCheckpointManager

    source = Path(importlib.util.find_spec("megatron.bridge").submodule_search_locations[0]) / "training" / "checkpointing.py"
    (protocol,) = [n for n in ast.parse(source.read_text()).body
                   if isinstance(n, ast.ClassDef) and n.name == "CheckpointManager"]
    members = {n.name: [a.arg for a in n.args.args] for n in protocol.body if isinstance(n, ast.FunctionDef)}
    assert {"load", "save", "finalize_async_saves"} <= set(members)
    for name, params in members.items():
        ours = list(inspect.signature(getattr(ProResCheckpointManager, name)).parameters)
        assert ours[:len(params)] == params, (name, ours, params)


def test_example_recipe_dry_run_validates_and_prints_alpha(monkeypatch, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    from prores_megatron.training import ProResArgumentError

    path = Path(__file__).resolve().parents[2] / "examples" / "scripts" / "pretrain_llama_prores_bridge.py"
    spec = importlib.util.spec_from_file_location("pretrain_llama_prores_bridge", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(sys, "argv", [str(path), "--dry-run", "--num-layers", "4", "--prores-warmup-steps", "2"])
    example.main()
    out = capsys.readouterr().out
    # min(t / (2 l), 1) for l = 1..4, by hand: t = 2 -> 1, 1/2, 1/3, 1/4; t = 8 = T*L -> all 1.
    assert "alpha at t=0: 0 0 0 0\n" in out and "alpha at t=2: 1 0.5 0.333 0.25\n" in out
    assert "alpha at t=8: 1 1 1 1\n" in out and "ProResLayerSpec(schedule='linear', warmup_steps=2.0" in out
    monkeypatch.setattr(sys, "argv", [str(path), "--dry-run", "--num-layers", "4", "--prores-arch", "bogus"])
    with pytest.raises(ProResArgumentError, match="--prores-arch"):
        example.main()


def test_an_iteration_bridge_skips_leaves_the_monitor_running(tmp_path):
    """``cfg.train.iterations_to_skip``: Bridge 0.6.2's train() then does step += 1 with no callback
    event. The monitor records the gap as not trained (no spike) and goes on; alpha keeps following
    Bridge's step counter, skipped iterations included (docs/usage.md)."""
    from prores_megatron.analysis.report_command import score
    from prores_megatron.bridge import ProResConfig, attach_prores
    from prores_megatron.monitoring.run_logs import load_run
    from prores_megatron.monitoring.spike_score import SpikeConfig

    cfg, skip, iters = model_config(), 5, 10
    prores = ProResConfig(schedule="linear", warmup_steps=T, monitor_interval=4, spike_window=4, spike_min_history=2,
                          monitor_file=str(tmp_path / "monitor.jsonl"))
    args = attach_prores(cfg, prores, train_iters=iters)
    args.save = args.tensorboard_dir = None
    args.use_distributed_optimizer = args.sequence_parallel = False
    seen = bridge_loop(cfg, args, iters, grad_norm=1.0, skip={skip}).seen
    assert sorted(seen) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert seen[5] == pytest.approx([1, 1, 5 / 6], abs=1e-7)  # t = 5 after the skip: min(5 / (2 l), 1)
    records = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    steps = {r["iteration"]: r for r in records if r["kind"] == "step"}
    assert sorted(steps) == list(range(1, iters + 1))
    assert steps[skip]["not_trained"] is True and steps[skip]["lm_loss"] is None
    assert not any(steps[i].get("not_trained") for i in steps if i != skip)
    # By hand (N = 10, candidates 1..9, min history 2): t = 1, 2 lack history, 5 was not trained,
    # 3, 4, 6, 7, 8, 9 are judged.
    (spikes,) = [r for r in records if r["kind"] == "spikes"]
    assert spikes["evaluated_steps"] == 6 and skip not in spikes["loss_spike_iterations"]
    run = load_run("bridge", [tmp_path / "monitor.jsonl"])
    assert run.not_trained == {skip}
    result, reason = score(run.steps["lm_loss"], SpikeConfig(window=4, min_history=2), run.not_trained)
    assert reason is None and result.evaluated == 6 and skip not in result.spike_iterations


def test_without_bridge_the_import_names_the_install(monkeypatch):
    """No Megatron-Bridge: ``import prores_megatron.bridge`` fails at once, naming what to install.
    ``sys.modules[name] = None`` is how Python marks a module as absent (find_spec returns None)."""
    import importlib
    import sys

    for name in [n for n in sys.modules if n.startswith(("prores_megatron.bridge", "megatron.bridge"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "megatron.bridge", None)
    monkeypatch.delattr(importlib.import_module("prores_megatron"), "bridge", raising=False)
    with pytest.raises(ImportError, match=r"pip install megatron-bridge==0\.6\.2"):
        importlib.import_module("prores_megatron.bridge")

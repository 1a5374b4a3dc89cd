"""Where the Megatron-LM integration writes alpha: around train_step and around evaluation, read
back from the model's alpha buffers. Hand values: linear, T = 2, 4 layers: alpha(l, t) = min(t / 2l, 1)."""

from types import SimpleNamespace

import pytest
import torch

from models import gpt_model, llama_config

L, T = 4, 2.0


def expected(t):
    return [torch.tensor(min(t / (T * l), 1.0), dtype=torch.float32).item() for l in range(1, L + 1)]


def alphas(model):
    from prores_megatron import ProResBiasDropoutAdd

    return [[m.alpha.item() for m in layer.modules() if isinstance(m, ProResBiasDropoutAdd)][0]
            for layer in model.decoder.layers]


@pytest.mark.usefixtures("mcore_world1")
def test_alpha_is_written_before_train_step_and_before_evaluation(monkeypatch):
    from megatron.training import training

    from prores_megatron import get_prores_layer_spec
    from prores_megatron.training.model_config import set_alpha_per_iteration

    seen = []
    monkeypatch.setattr(training, "train_step", lambda fs, it, model, *a, **k: seen.append(("train", alphas(model))))
    monkeypatch.setattr(training, "evaluate_and_print_results",
                        lambda prefix, fs, it, model, iteration, *a, **k: seen.append(("eval", alphas(model))))
    monkeypatch.setattr(training, "get_tensorboard_writer", lambda: None, raising=False)
    model = gpt_model(llama_config(num_layers=L), get_prores_layer_spec("local", warmup_steps=T))
    args = SimpleNamespace(prores_schedule="linear", prores_warmup_steps=T, num_layers=L, prores_start_step=3,
                           log_interval=1000, curr_iteration=5)
    set_alpha_per_iteration(args)
    set_alpha_per_iteration(args)  # configuring twice wraps once
    assert training.train_step.prores_inner.__name__ == "<lambda>"
    training.train_step(None, None, model, None, None, None, None)
    # --skip-train with a checkpoint at iteration 9: evaluation uses the last completed step, t = 9 - 1 - 3.
    training.evaluate_and_print_results("valid", None, None, model, 9, None, None)
    assert seen == [("train", expected(5 - 3)), ("eval", expected(9 - 1 - 3))]


def test_graphs_turn_the_alpha_one_fast_path_off():
    """With --cuda-graph-impl set, alpha = 1 runs the scaled kernel too (what a graph captures)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    from prores_megatron import get_prores_layer_spec, set_prores_step
    from prores_megatron.core.residual_scale import ProResBiasDropoutAdd

    model = gpt_model(llama_config(num_layers=L), get_prores_layer_spec("local", warmup_steps=T))
    set_prores_step(model, 100, check_coverage=False)  # alpha = 1 everywhere
    module = next(m for m in model.modules() if isinstance(m, ProResBiasDropoutAdd))
    assert module(False, False).__module__ == get_bias_dropout_add(False, False).__module__  # stock
    for layer in model.decoder.layers:
        layer.config.cuda_graph_impl = "local"
    model._prores_step = None
    set_prores_step(model, 100, check_coverage=False)
    fn = module(False, False)
    assert fn.__module__ == "prores_megatron.core.residual_scale"
    module.alpha.fill_(0.5)  # a later alpha < 1 reaches what was built at alpha = 1
    x, r = torch.ones(2, 1, 32), torch.zeros(2, 1, 32)
    assert torch.equal(fn((x, None), r, 0.0), torch.full_like(x, 0.5))

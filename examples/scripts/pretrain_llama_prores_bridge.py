"""Llama 3 8B pretraining with ProRes through Megatron-Bridge 0.6.2 (docs/bridge.md §4).

    torchrun --nproc_per_node 2 examples/scripts/pretrain_llama_prores_bridge.py \
        --prores-schedule linear --prores-warmup-steps 1000 [--train-iters N] [--save DIR] [--load DIR]
    python examples/scripts/pretrain_llama_prores_bridge.py --dry-run --num-layers 4   # CPU: settings only

Bridge's own recipe (``llama3_8b_pretrain_config``: mock data, its parallelism and optimizer) is
used unchanged; ProRes is two lines: ``prores_callback(cfg, ProResConfig(...))`` plugs the layer
spec and its checkpoint metadata into ``cfg.model``, names ProRes's checkpoint manager in
``cfg.checkpoint`` (a resume is read under the checkpoint allow-list and compared with the saved
ProRes settings) and returns the callback ``pretrain`` runs.
``--dry-run`` validates the ProRes settings against a Llama-shaped megatron-core config with the
same checks as training and prints alpha at a few steps, without Bridge's recipes or a GPU.
"""

import argparse


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prores-schedule", default="linear")
    p.add_argument("--prores-warmup-steps", type=float, default=1000)
    p.add_argument("--prores-arch", default="pre")
    p.add_argument("--prores-monitor-interval", type=int, default=0)
    p.add_argument("--train-iters", type=int)
    p.add_argument("--num-layers", type=int, help="override the recipe's depth (a short smoke run)")
    p.add_argument("--save", help="checkpoint directory (cfg.checkpoint.save)")
    p.add_argument("--load", help="checkpoint directory to resume from (cfg.checkpoint.load)")
    p.add_argument("--dry-run", action="store_true")
    return p.parse_args()


def prores_settings(a):
    from prores_megatron.bridge import ProResConfig

    return ProResConfig(schedule=a.prores_schedule, warmup_steps=a.prores_warmup_steps, arch=a.prores_arch,
                        monitor_interval=a.prores_monitor_interval)


def dry_run(a):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.models.gpt import GPTModelConfig

    from prores_megatron.bridge import attach_prores
    from prores_megatron.core import alpha_table

    L = a.num_layers or 32
    cfg = GPTModelConfig(transformer=TransformerConfig(
        num_layers=L, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        transformer_impl="local"), vocab_size=128, seq_length=64, position_embedding_type="rope")
    prores = prores_settings(a)
    attach_prores(cfg, prores, train_iters=a.train_iters)
    print(f"ProRes settings valid: {prores}")
    print(f"layer spec: {cfg.transformer_layer_spec!r}; recorded: {cfg.extra_checkpoint_metadata}")
    for t in (0, int(prores.warmup_steps or 0), int((prores.warmup_steps or 0) * L)):
        print(f"alpha at t={t}: " + " ".join(f"{x:.3g}" for x in alpha_table(prores.schedule, t, prores.warmup_steps, L)))


def main():
    a = parse()
    if a.dry_run:
        return dry_run(a)
    from megatron.bridge.recipes.llama import llama3_8b_pretrain_config
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    from prores_megatron.bridge import prores_callback

    cfg = llama3_8b_pretrain_config()
    if a.num_layers:
        cfg.model.num_layers = a.num_layers
    if a.train_iters:
        cfg.train.train_iters = a.train_iters
    if a.save:
        cfg.checkpoint.save = a.save
    if a.load:
        cfg.checkpoint.load = a.load
    callback = prores_callback(cfg, prores_settings(a))
    pretrain(cfg, forward_step, callbacks=[callback])


if __name__ == "__main__":
    main()

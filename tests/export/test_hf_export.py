"""Hugging Face export of real Megatron-LM checkpoints, checked against Megatron's own forward.

The checkpoints (A: TP2 GQA Pre-LN, B: PP2 x VPP2 LNS; linear ProRes, T=2, 4 layers, saved at
iterations 3 and 9) are made once per session by ``megatron_checkpoints.py``. The exports are
loaded with ``transformers.LlamaForCausalLM`` and their logits compared with a world-size-1
megatron-core GPTModel built here from the saved arguments, loaded with megatron-core's
``dist_checkpointing.load`` and stepped with ``set_prores_step`` (fp32, <= 1e-4).
--apply-layernorm-1p cannot be trained on CPU (megatron-core's torch norms refuse zero-centred
gamma; only TE/apex have it), so its test rewrites B's legacy checkpoint as w - 1 with the flag set,
which must export to the same model.
"""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_checkpoints import (
    END,
    MID,
    ROOT,
    TOL,
    VOCAB,
    L,
    T,
    copy_checkpoint,
    edit_metadata,
    export,
    exported,
    it_dir,
    refuse,
    rewrite_legacy_args,
)


def tokens_batch(vocab):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, 48), generator=g)


def megatron_logits(ckpt_dir: Path, tokens, vocab):
    """The checkpoint's own forward at its iteration: world-size-1 GPTModel, megatron-core loading."""
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from prores_megatron import get_prores_layer_spec, set_prores_step

    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    a, iteration = common["args"], common["iteration"]
    config = TransformerConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups if a.group_query_attention else None, kv_channels=a.kv_channels,
        ffn_hidden_size=a.ffn_hidden_size, normalization="RMSNorm", layernorm_epsilon=a.layernorm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=a.add_bias_linear, add_qkv_bias=a.add_qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        apply_rope_fusion=False, bias_activation_fusion=False, params_dtype=torch.float32,
    )
    spec = get_prores_layer_spec("local", schedule=a.prores_schedule, warmup_steps=a.prores_warmup_steps,
                                 arch=a.prores_arch, config=config)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=a.padded_vocab_size,
        max_sequence_length=a.max_position_embeddings, position_embedding_type="rope", rotary_base=a.rotary_base,
        rope_scaling=a.use_rope_scaling, rope_scaling_factor=a.rope_scaling_factor,
        share_embeddings_and_output_weights=not a.untie_embeddings_and_output_weights,
    )
    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir))
    missing, _ = model.load_state_dict(state, strict=False)
    assert not [k for k in missing if "_extra_state" not in k], missing
    model.eval()
    set_prores_step(model, iteration)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)[..., :vocab].float()


def hf_logits(out_dir: Path, tokens):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def hf_tensors(out_dir: Path):
    from safetensors import safe_open

    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out_dir / shard), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    assert sorted(out) == sorted(index["weight_map"])
    return out


# ---- exactness against Megatron ------------------------------------------------------------


@pytest.mark.usefixtures("mcore_world1")
@pytest.mark.parametrize("name", ["A", "B"])
@pytest.mark.parametrize("iteration", [MID, END], ids=["mid_warmup", "after_warmup"])
def test_logits_match_megatron_forward(runs, name, iteration):
    from prores_megatron import alpha_table

    ckpt = it_dir(runs["ckpt"][(name, "torch_dist")], iteration)
    out = exported(runs, name, iteration=iteration)
    tokenizer = runs["sp"] if name == "B" else None
    expected_alpha = alpha_table("linear", iteration, T, L)
    provenance = json.loads((out / "prores_export.json").read_text())
    assert provenance["alpha_per_layer"] == expected_alpha and provenance["step"] == iteration
    if iteration == MID:
        assert 0 < expected_alpha.count(1.0) < L  # really mid-warmup
    else:
        assert expected_alpha == [1.0] * L
    tokens = tokens_batch(VOCAB[name])
    ref = megatron_logits(ckpt, tokens, VOCAB[name])
    got = hf_logits(out, tokens)
    diff = (ref - got).abs().max().item()
    print(f"\n{name} iteration {iteration}: alpha {expected_alpha}, max |logit diff| = {diff:.3g} "
          f"(logit scale {ref.abs().max().item():.3g})")
    assert diff <= TOL
    if iteration == MID:
        # The comparison can tell: the same weights without the fold (alpha = 1) are far off.
        unfolded = export(ckpt, runs["tmp"] / f"hf_{name}_unfolded", step=100, tokenizer_model=tokenizer)
        assert list(unfolded["alphas"]) == [1.0] * L
        assert (hf_logits(runs["tmp"] / f"hf_{name}_unfolded", tokens) - ref).abs().max().item() > 100 * TOL
    if name == "B" and iteration == MID:
        # ... and so can LNS: without 1/sqrt(l) in the norms the model is different.
        export(ckpt, runs["tmp"] / "hf_B_as_pre", prores_arch="pre", tokenizer_model=tokenizer)
        assert (hf_logits(runs["tmp"] / "hf_B_as_pre", tokens) - ref).abs().max().item() > 100 * TOL


def test_config_and_weights_layout(runs):
    out = exported(runs, "A")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 500 and cfg["num_key_value_heads"] == 2 and cfg["num_attention_heads"] == 4
    assert cfg["head_dim"] == 16 and cfg["rope_theta"] == 5000.0 and cfg["rope_scaling"] is None
    assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    assert cfg["eos_token_id"] == 499  # NullTokenizer's EOD is V - 1
    w = hf_tensors(out)
    assert w["model.embed_tokens.weight"].shape == (500, 64) and w["lm_head.weight"].shape == (500, 64)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert w["model.layers.0.mlp.gate_proj.bias"].shape == (172,) and w["model.layers.3.mlp.down_proj.bias"].shape == (64,)
    provenance = json.loads((out / "prores_export.json").read_text())
    assert provenance["iteration"] == MID and provenance["step"] == MID
    cfg_b = json.loads((exported(runs, "B") / "config.json").read_text())
    assert cfg_b["tie_word_embeddings"] is True and cfg_b["vocab_size"] == 300
    assert cfg_b["rope_scaling"]["rope_type"] == "llama3" and cfg_b["rope_scaling"]["factor"] == 8.0
    assert cfg_b["attention_bias"] is True and cfg_b["mlp_bias"] is False
    w_b = hf_tensors(exported(runs, "B"))
    assert "lm_head.weight" not in w_b
    assert torch.all(w_b["model.layers.2.self_attn.o_proj.bias"] == 0)  # qkv-only bias: o_proj's is zero


# ---- formats, 1p, tokenizer, generation ----------------------------------------------------


@pytest.mark.parametrize("name", ["A", "B"])
def test_legacy_torch_format_gives_the_same_weights(runs, name):
    for dtype in ("float32", "bfloat16"):
        outs = {fmt: hf_tensors(exported(runs, name, fmt, MID, dtype)) for fmt in ("torch_dist", "torch")}
        assert sorted(outs["torch"]) == sorted(outs["torch_dist"])
        for key, value in outs["torch_dist"].items():
            assert value.dtype == getattr(torch, dtype)
            assert torch.equal(value, outs["torch"][key]), key


@pytest.mark.usefixtures("mcore_world1")
def test_layernorm_1p_is_folded_as_one_plus_w(runs, tmp_path):
    """B's legacy checkpoint rewritten with zero-centred gammas (w - 1, --apply-layernorm-1p)."""
    src = it_dir(runs["ckpt"][("B", "torch")], MID)
    derived = tmp_path / "iter_0000003"
    shutil.copytree(src, derived)
    norms = 0
    for f in derived.glob("mp_rank_*/model_optim_rng.pt"):
        state = torch.load(f, weights_only=False)
        state["args"].layernorm_zero_centered_gamma = True
        for chunk in [k for k in state if k.startswith("model")]:
            for key in state[chunk]:
                if key.endswith("layernorm.weight") or key.endswith("layernorm.norm.weight"):
                    state[chunk][key] = state[chunk][key] - 1.0
                    norms += 1
        torch.save(state, f)
    assert norms == 2 * L + 1  # two norms per layer and the final norm
    out = tmp_path / "hf"
    export(derived, out, tokenizer_model=runs["sp"])
    plain = hf_tensors(exported(runs, "B", "torch"))
    got = hf_tensors(out)
    for key, value in plain.items():
        if "norm" in key:
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got[key], value), key
    tokens = tokens_batch(VOCAB["B"])
    ref = megatron_logits(it_dir(runs["ckpt"][("B", "torch_dist")], MID), tokens, VOCAB["B"])
    diff = (hf_logits(out, tokens) - ref).abs().max().item()
    print(f"\nB with layernorm-1p, iteration {MID}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL


def test_generate_with_exported_tokenizer_bf16_sharded(runs, tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "hf_B_bf16"
    summary = export(it_dir(runs["ckpt"][("B", "torch_dist")], END), out, dtype="bfloat16",
                     tokenizer_model=runs["sp"], max_shard_size="100KB")
    assert summary["shards"] > 1
    assert len(list(out.glob("model-*.safetensors"))) == summary["shards"]
    assert all(t.dtype == torch.bfloat16 for t in hf_tensors(out).values())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(runs["sp"]))
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "the deep network is a llama model of residual warmup."
    assert tok(text)["input_ids"] == sp.encode(text)
    assert tok.eos_token_id == sp.eos_id()
    model = LlamaForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    ids = tok(text, return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    new = generated[0, ids.shape[1]:].tolist()
    assert new and tok.decode(new, skip_special_tokens=True) == sp.decode([i for i in new if i != sp.eos_id()])


def test_cli_and_console_command(runs, tmp_path):
    out = tmp_path / "cli_out"
    ckpt = runs["ckpt"][("A", "torch_dist")]  # the save directory: follows latest_checkpointed_iteration.txt
    cmd = [sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), str(ckpt), str(out), "--prores-warmup-steps", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"iteration {END}" in proc.stderr and "layer 4/4 written" in proc.stderr
    assert "--prores-warmup-steps 3 overrides the checkpoint's 2" in proc.stderr
    assert json.loads((out / "prores_export.json").read_text())["warmup_steps"] == 3.0
    console = Path(sys.executable).parent / "prores-megatron-convert-to-hf"
    assert console.exists(), "setup.py's console script is not installed (run tools/setup_env.sh)"
    proc = subprocess.run([str(console), str(ckpt), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "already exists; pass --force" in proc.stderr


# ---- refusals: named, before any work, nothing left behind ---------------------------------


def test_refuses_keys_and_shapes_that_disagree_with_the_arguments(runs, tmp_path):
    ckpt = copy_checkpoint(runs, tmp_path, "A", "torch_dist")
    edit_metadata(ckpt, lambda sd: sd.pop("decoder.final_layernorm.weight"))
    refuse(ckpt, tmp_path / "o1", "missing decoder.final_layernorm.weight")

    ckpt = copy_checkpoint(runs, tmp_path / "x", "A", "torch_dist")
    edit_metadata(ckpt, lambda sd: sd.__setitem__("decoder.layers.mlp.router.weight",
                                                  copy.deepcopy(sd["decoder.layers.mlp.linear_fc1.layer_norm_weight"])))
    refuse(ckpt, tmp_path / "o2", "no place for: decoder.layers.mlp.router.weight")

    def bigger_ffn(args):
        args.ffn_hidden_size = 180

    legacy = rewrite_legacy_args(copy_checkpoint(runs, tmp_path, "B", "torch"), bigger_ffn)
    refuse(legacy, tmp_path / "o3", r"linear_fc1.weight has shape \(4, 344, 64\).*--ffn-hidden-size.*\(4, 360, 64\)",
           tokenizer_model=runs["sp"])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: setattr(a, "normalization", "LayerNorm"), "--normalization 'LayerNorm': a Llama model uses RMSNorm"),
        (lambda a: setattr(a, "num_experts", 8), "--num-experts 8: MoE layers have no dense Llama equivalent"),
        (lambda a: setattr(a, "swiglu", False), "without --swiglu"),
        (lambda a: setattr(a, "position_embedding_type", "learned_absolute"), "--position-embedding-type"),
        (lambda a: setattr(a, "prores_arch", "sandwich"), "--prores-arch sandwich: Sandwich-LN normalises each branch output"),
    ],
    ids=["layernorm", "moe", "no_swiglu", "learned_positions", "sandwich"],
)
def test_refuses_models_that_are_not_llama(runs, tmp_path, change, match):
    legacy = rewrite_legacy_args(copy_checkpoint(runs, tmp_path, "B", "torch"), change)
    refuse(legacy, tmp_path / "out", match)


@pytest.mark.parametrize("arch, why", [("post", "Post-LN normalises after the residual add"),
                                       ("deepnorm", "DeepNorm scales the skip path")])
def test_refuses_post_ln_and_deepnorm_with_the_reason(runs, tmp_path, arch, why):
    refuse(it_dir(runs["ckpt"][("A", "torch_dist")], MID), tmp_path / "out", f"--prores-arch {arch}: {why}",
           prores_arch=arch)


def test_refuses_bad_flags_before_any_work(runs, tmp_path):
    ckpt = it_dir(runs["ckpt"][("A", "torch_dist")], MID)
    refuse(ckpt, tmp_path / "o1", "--tokenizer-model .*no such file", tokenizer_model=tmp_path / "missing.model")
    refuse(ckpt, tmp_path / "o2", "--max-shard-size", max_shard_size="lots")
    refuse(ckpt, tmp_path / "o3", "--step -1", step=-1)
    refuse(ckpt, tmp_path / "o4", "--dtype 'int8'", dtype="int8")
    refuse(ckpt, tmp_path / "o5", "vocabulary size 600 is larger than the checkpoint's embedding", vocab_size=600)
    refuse(ckpt, tmp_path / "o6", "--prores-schedule", prores_schedule="Linear")
    refuse(ckpt, tmp_path / "o7", "--vocab-size 123 disagrees with --tokenizer-model", tokenizer_model=runs["sp"],
           vocab_size=123)
    from prores_megatron.export.exporter import ExportError

    with pytest.raises(ExportError, match="contains the checkpoint"):  # --force would delete it
        export(ckpt, ckpt.parent, force=True)
    assert ckpt.is_dir() and not list(ckpt.parent.glob(f".{ckpt.parent.name}.*"))


def test_existing_output_needs_force_and_failures_leave_nothing(runs, tmp_path, monkeypatch):
    ckpt = it_dir(runs["ckpt"][("A", "torch_dist")], MID)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    from prores_megatron.export.exporter import ExportError

    with pytest.raises(ExportError, match="already exists; pass --force"):
        export(ckpt, mine)
    # --force replaces only an empty directory or a previous export: never someone's directory.
    with pytest.raises(ExportError, match="is not a previous export of prores-megatron-convert-to-hf"):
        export(ckpt, mine, force=True)
    assert (mine / "keep.txt").read_text() == "mine" and len(list(mine.iterdir())) == 1

    out = tmp_path / "out"
    export(ckpt, out)
    before = (out / "config.json").read_bytes()
    # Ctrl-C in the middle of layer 3: the previous export survives, nothing partial appears.
    import prores_megatron.export.exporter as hf_export

    real = hf_export.convert_layer

    def interrupted(layout, i, tensors):
        if i == 2:
            raise KeyboardInterrupt
        return real(layout, i, tensors)

    monkeypatch.setattr(hf_export, "convert_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(ckpt, out, force=True)
    assert (out / "config.json").read_bytes() == before
    assert not list(tmp_path.glob(".out.*"))
    with pytest.raises(KeyboardInterrupt):
        export(ckpt, tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # created parents are removed again
    monkeypatch.setattr(hf_export, "convert_layer", real)

    export(ckpt, out, force=True, step=1)  # a previous export is replaced
    assert json.loads((out / "prores_export.json").read_text())["step"] == 1
    assert not list(tmp_path.glob(".out.*"))

    # A previous export someone added to (a git repository, notes) is theirs now.
    (out / ".git").mkdir()
    (out / "notes.md").write_text("x")
    with pytest.raises(ExportError, match=r"holds files an export does not write \(\.git, notes\.md\)"):
        export(ckpt, out, force=True)
    assert (out / ".git").is_dir() and (out / "notes.md").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    export(ckpt, empty, force=True)
    assert (empty / "config.json").exists()

    # The current directory (an export or not) is never replaced: `convert CKPT . --force`.
    monkeypatch.chdir(empty)
    with pytest.raises(ExportError, match="contains the current directory"):
        export(ckpt, ".", force=True)
    with pytest.raises(ExportError, match="contains the current directory"):
        export(ckpt, tmp_path, force=True)
    assert (empty / "config.json").exists() and (mine / "keep.txt").exists()


# ---- the folding math on synthetic tensors -------------------------------------------------


def test_qkv_split_and_folding_by_hand():
    from prores_megatron.checkpoint.tensor_names import split_gate_up, split_qkv
    from prores_megatron.export.llama_tensors import fold_branch, norm_gain

    heads, groups, d, H = 6, 2, 3, 5
    w = torch.arange((heads + 2 * groups) * d * H, dtype=torch.float32).reshape(-1, H)
    q, k, v = split_qkv(w, heads, groups, d)
    rows = list(w)  # Megatron's order: per group, its 3 query heads then k then v
    per = heads // groups
    exp_q, exp_k, exp_v = [], [], []
    for g in range(groups):
        base = g * (per + 2) * d
        exp_q += rows[base: base + per * d]
        exp_k += rows[base + per * d: base + (per + 1) * d]
        exp_v += rows[base + (per + 1) * d: base + (per + 2) * d]
    assert torch.equal(q, torch.stack(exp_q)) and torch.equal(k, torch.stack(exp_k)) and torch.equal(v, torch.stack(exp_v))
    gate, up = split_gate_up(torch.arange(8.0).reshape(4, 2))
    assert gate.tolist() == [[0, 1], [2, 3]] and up.tolist() == [[4, 5], [6, 7]]
    # alpha * (W z + b) == (alpha W) z + alpha b
    g = torch.Generator().manual_seed(0)
    W, b, z = torch.randn(4, 3, generator=g), torch.randn(4, generator=g), torch.randn(3, generator=g)
    a = 0.375
    torch.testing.assert_close(fold_branch(W, a) @ z + fold_branch(b, a), a * (W @ z + b))
    assert torch.equal(fold_branch(W, 1.0), W)
    # LNS + layernorm-1p: the effective gain is (1 + w) / sqrt(l); layer 4 -> 1/2
    wn = torch.tensor([-1.0, 0.0, 0.5])
    assert norm_gain(wn, True, 0.5).tolist() == [0.0, 0.5, 0.75]
    assert norm_gain(wn, False, 1.0).tolist() == wn.tolist()


def saved_args(runs, name="A"):
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(it_dir(runs["ckpt"][(name, "torch_dist")], MID)))["args"]


# A value of each setting that no Llama layer computes (independent of the exporter's table).
NOT_LLAMA = {
    "position_embedding_type": "learned_absolute", "normalization": "LayerNorm", "squared_relu": True,
    "num_experts": 8, "multi_latent_attention": True, "experimental_attention_variant": "gated_delta_net",
    "linear_attention_freq": 4, "qk_layernorm": True, "qk_l2_norm": True, "attention_output_gate": True,
    "softmax_type": "off-by-one", "window_size": (128, 0), "no_rope_freq": 4, "mrope_section": [16, 24, 24],
    "rotary_interleaved": True, "rotary_percent": 0.5, "use_mup": True, "activation_func_clamp_value": 7.0,
    "heterogeneous_layers_config_path": "h.json", "heterogeneous_layers_config_encoded_json": "{}",
    "is_hybrid_model": True, "hybrid_override_pattern": "M*M*", "mtp_num_layers": 1,
}


def test_start_step_shifts_the_folded_alpha(runs):
    """A run with --prores-start-step 2 saved at iteration 3 folds alpha at t = 1: linear, T = 2."""
    from prores_megatron.export.llama_layout import resolve_layout

    args = saved_args(runs)
    args.prores_start_step = 2
    layout, notes = resolve_layout(args, MID)
    assert layout.step == MID - 2
    assert list(layout.alphas) == [min(1 / (T * l), 1.0) for l in range(1, L + 1)]  # 0.5, 0.25, 1/6, 0.125
    assert any("--prores-start-step 2: alpha at t = 3 - 2 = 1" in n for n in notes)


def test_sample_counted_warmup_folds_alpha_of_the_consumed_samples(runs):
    """A run with --prores-warmup-samples 16 whose checkpoint consumed 24 samples folds
    alpha(l) = min(24 / (16 l), 1) by hand: 1, 0.75, 0.5, 0.375, ..., whatever its iteration."""
    from prores_megatron.export.llama_layout import ExportError, resolve_layout

    args = saved_args(runs)
    args.prores_warmup_steps, args.prores_warmup_samples, args.consumed_train_samples = None, 16.0, 24
    layout, notes = resolve_layout(args, MID)
    assert layout.step == 24
    assert list(layout.alphas) == [min(24 / (16 * l), 1.0) for l in range(1, L + 1)]
    assert any("--prores-warmup-samples 16: alpha at s = 24 consumed samples" in n for n in notes)
    del args.consumed_train_samples
    with pytest.raises(ExportError, match="no consumed_train_samples"):
        resolve_layout(args, MID)


def test_layout_refuses_every_setting_llama_cannot_compute(runs):
    from prores_megatron.export.llama_layout import _UNSUPPORTED, ExportError, resolve_layout

    base = saved_args(runs)
    resolve_layout(base, MID)  # the unmodified arguments are fine
    covered = set()
    for names, _, flag, _ in _UNSUPPORTED:
        attr = names[0]
        covered.add(attr)
        args = copy.deepcopy(base)
        setattr(args, attr, NOT_LLAMA[attr])
        with pytest.raises(ExportError, match=f"{flag} .*no Hugging Face Llama model computes the same function"):
            resolve_layout(args, MID)
    assert covered == set(NOT_LLAMA)

    def refused(match, change=None, **overrides):
        args = copy.deepcopy(base)
        if change:
            change(args)
        with pytest.raises(ExportError, match=match):
            resolve_layout(args, MID, overrides)

    def both_scalings(a):
        a.use_rope_scaling, a.rotary_seq_len_interpolation_factor = True, 2.0

    refused("both --use-rope-scaling and --rotary-seq-len-interpolation-factor", both_scalings)
    refused("--num-query-groups 3 does not divide --num-attention-heads 4", lambda a: setattr(a, "num_query_groups", 3))
    refused("no padded_vocab_size", lambda a: setattr(a, "padded_vocab_size", None))
    refused("does not record the true vocabulary size", lambda a: setattr(a, "tokenizer_type", "HuggingFaceTokenizer"))
    refused("needs --prores-warmup-steps", lambda a: setattr(a, "prores_warmup_steps", None))
    refused("--prores-warmup-steps -1.0: must be a positive", prores_warmup_steps=-1.0)
    refused("--prores-arch 'foo' is not a known architecture", prores_arch="foo")



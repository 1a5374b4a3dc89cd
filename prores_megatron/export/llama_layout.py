"""Which Hugging Face Llama model a Megatron GPT checkpoint is, decided from its saved arguments.

Contract: ``resolve_layout(args, iteration, overrides)`` returns ``(ExportLayout, notes)``:

- it refuses, with an ``ExportError`` naming the Megatron flag and why, every model a Llama layer
  cannot compute exactly (MoE, MLA, LayerNorm, non-SwiGLU, QK-norm, partial or interleaved RoPE,
  Post-LN / Sandwich-LN / DeepNorm residuals, ...);
- ``overrides`` (``vocab_size``, ``prores_schedule``, ``prores_warmup_steps``, ``prores_arch``,
  ``step``; ``None`` = take it from the checkpoint) win over the saved values, and every override
  that disagrees with the checkpoint adds a note saying so;
- the layout then knows the Megatron tensors the checkpoint must hold (``megatron_shapes``), the
  HF tensors to write in order (``hf_tensors``), ``config.json`` (``hf_config``) and, per layer, the
  ProRes alpha(l, t) to fold in (``alphas``) and LNS's 1/sqrt(l) (``norm_scales``).

The alpha step t defaults to the saved ``iteration`` (the completed optimizer steps) minus the
run's ``--prores-start-step``, i.e. the alpha the next training step would use. Megatron's own evaluation at that checkpoint ran with t =
iteration - 1 (the last training step's value); pass ``step`` to export that model instead.
No torch, no Megatron import: this is arithmetic on the argument namespace.
"""

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from ..checkpoint.tensor_names import EMBEDDING, FC1, FC2, FINAL_NORM, LAYER_PREFIX, OUTPUT, PROJ, QKV
from ..core.schedules import alpha, canonical_schedule, needs_warmup_steps, prores_step, total_warmup_steps

ARCHS_EXPORTABLE = ("pre", "lns")
ARCH_REFUSALS = {
    "post": "Post-LN normalises after the residual add (x_{l+1} = Norm(x_l + a*F(x_l))), while a "
    "Llama layer is Pre-LN (x + F(Norm(x)))",
    "sandwich": "Sandwich-LN normalises each branch output (x + a*Norm'(F(Norm(x)))); a Llama "
    "layer has no norm after its attention or MLP",
    "deepnorm": "DeepNorm scales the skip path by (2L)^(1/4) and normalises after the add "
    "(Norm(c*x + a*F(x))); a Llama layer is Pre-LN with an unscaled skip",
}



class ExportError(ValueError):
    """The checkpoint (or a flag) describes a model this exporter cannot write exactly."""


def _get(args, *names, default=None):
    """First attribute present on ``args`` (Megatron renamed some: norm_epsilon -> layernorm_epsilon)."""
    for name in names:
        if hasattr(args, name):
            return getattr(args, name)
    return default


# (attribute(s), is the value supported?, Megatron flag, why a Llama layer cannot compute it)
_UNSUPPORTED = (
    (("position_embedding_type",), lambda v: v == "rope", "--position-embedding-type",
     "a Llama model uses rotary position embeddings only"),
    (("normalization",), lambda v: v == "RMSNorm", "--normalization",
     "a Llama model uses RMSNorm"),
    (("squared_relu",), lambda v: not v, "--squared-relu", "a Llama MLP is SwiGLU"),
    (("num_experts",), lambda v: not v, "--num-experts", "MoE layers have no dense Llama equivalent"),
    (("multi_latent_attention",), lambda v: not v, "--multi-latent-attention", "Llama attention is GQA/MHA"),
    (("experimental_attention_variant",), lambda v: not v, "--experimental-attention-variant", "Llama attention is GQA/MHA"),
    (("linear_attention_freq",), lambda v: not v, "--linear-attention-freq", "Llama attention is softmax attention"),
    (("qk_layernorm",), lambda v: not v, "--qk-layernorm", "Llama has no query/key norm"),
    (("qk_l2_norm",), lambda v: not v, "--qk-l2-norm", "Llama has no query/key norm"),
    (("attention_output_gate",), lambda v: not v, "--attention-output-gate", "Llama has no attention output gate"),
    (("softmax_type",), lambda v: v in (None, "vanilla"), "--softmax-type", "Llama uses the vanilla softmax"),
    (("window_size",), lambda v: not v, "--window-size", "Llama attention is full causal (no sliding window)"),
    (("no_rope_freq",), lambda v: not v, "--no-rope-freq", "every Llama layer applies RoPE"),
    (("mrope_section",), lambda v: not v, "--mrope-section", "Llama RoPE is one-dimensional"),
    (("rotary_interleaved",), lambda v: not v, "--rotary-interleaved",
     "HF Llama uses the rotate-half RoPE convention"),
    (("rotary_percent",), lambda v: v in (None, 1.0), "--rotary-percent",
     "HF Llama rotates the whole head (partial rotary is not implemented by LlamaForCausalLM)"),
    (("use_mup",), lambda v: not v, "--use-mup", "muP multiplies embeddings, logits and attention scores; Llama does not"),
    (("activation_func_clamp_value",), lambda v: v is None, "--activation-func-clamp-value", "Llama's SwiGLU is unclamped"),
    (("heterogeneous_layers_config_path",), lambda v: not v, "--heterogeneous-layers-config-path", "Llama layers are identical"),
    (("heterogeneous_layers_config_encoded_json",), lambda v: not v, "--heterogeneous-layers-config-encoded-json", "Llama layers are identical"),
    (("is_hybrid_model",), lambda v: not v, "--hybrid-override-pattern", "hybrid (Mamba/attention) models are not Llama"),
    (("hybrid_override_pattern",), lambda v: not v, "--hybrid-override-pattern", "hybrid (Mamba/attention) models are not Llama"),
    (("mtp_num_layers",), lambda v: not v, "--mtp-num-layers", "Llama has no multi-token-prediction heads"),
)


@dataclass(frozen=True)
class ExportLayout:
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int  # the tokenizer's true size: embedding and output rows beyond it are padding
    padded_vocab: int
    eps: float
    max_positions: int
    rope_theta: float
    rope_scaling: Optional[dict]
    tied: bool
    zero_centered_gamma: bool  # --apply-layernorm-1p: the norm computes x_hat * (1 + w)
    qkv_bias: bool
    linear_bias: bool
    init_std: float
    arch: str
    schedule: str
    warmup_steps: Optional[float]
    iteration: int
    step: int

    @cached_property
    def alphas(self):
        """alpha(l, step) for l = 1..L: folded into o_proj and down_proj (and their biases)."""
        return tuple(alpha(self.schedule, l, self.step, self.warmup_steps, self.num_layers)
                for l in range(1, self.num_layers + 1))

    @cached_property
    def norm_scales(self):
        """The fixed factor on layer l's pre-norms: 1/sqrt(l) for LNS, else 1."""
        return tuple(1.0 / math.sqrt(l) if self.arch == "lns" else 1.0 for l in range(1, self.num_layers + 1))

    # -- the Megatron side --------------------------------------------------------------------

    def megatron_shapes(self):
        """Global shapes of every model tensor the checkpoint must hold (torch_dist names)."""
        L, H, F, d = self.num_layers, self.hidden, self.ffn, self.head_dim
        qkv_rows = (self.heads + 2 * self.groups) * d
        shapes = {
            EMBEDDING: (self.padded_vocab, H),
            LAYER_PREFIX + QKV + "layer_norm_weight": (L, H),
            LAYER_PREFIX + QKV + "weight": (L, qkv_rows, H),
            LAYER_PREFIX + PROJ + "weight": (L, H, self.heads * d),
            LAYER_PREFIX + FC1 + "layer_norm_weight": (L, H),
            LAYER_PREFIX + FC1 + "weight": (L, 2 * F, H),
            LAYER_PREFIX + FC2 + "weight": (L, H, F),
            FINAL_NORM: (H,),
        }
        if self.qkv_bias or self.linear_bias:
            shapes[LAYER_PREFIX + QKV + "bias"] = (L, qkv_rows)
        if self.linear_bias:
            shapes[LAYER_PREFIX + PROJ + "bias"] = (L, H)
            shapes[LAYER_PREFIX + FC1 + "bias"] = (L, 2 * F)
            shapes[LAYER_PREFIX + FC2 + "bias"] = (L, H)
        if not self.tied:
            shapes[OUTPUT] = (self.padded_vocab, H)
        return shapes

    def layer_tensor_names(self):
        return [k for k in self.megatron_shapes() if k.startswith(LAYER_PREFIX)]

    # -- the Hugging Face side ----------------------------------------------------------------

    @property
    def attention_bias(self) -> bool:
        # HF's attention_bias puts a bias on q, k, v *and* o; a qkv-only bias gets a zero o bias.
        return self.qkv_bias or self.linear_bias

    def hf_layer_tensors(self, i):
        """[(name, shape)] of HF layer i (0-based) in the order they are written."""
        H, F, d = self.hidden, self.ffn, self.head_dim
        p = f"model.layers.{i}."
        out = [(p + "input_layernorm.weight", (H,))]
        for proj, rows in (("q", self.heads * d), ("k", self.groups * d), ("v", self.groups * d)):
            out.append((p + f"self_attn.{proj}_proj.weight", (rows, H)))
            if self.attention_bias:
                out.append((p + f"self_attn.{proj}_proj.bias", (rows,)))
        out.append((p + "self_attn.o_proj.weight", (H, self.heads * d)))
        if self.attention_bias:
            out.append((p + "self_attn.o_proj.bias", (H,)))
        out.append((p + "post_attention_layernorm.weight", (H,)))
        for proj, shape in (("gate", (F, H)), ("up", (F, H)), ("down", (H, F))):
            out.append((p + f"mlp.{proj}_proj.weight", shape))
            if self.linear_bias:
                out.append((p + f"mlp.{proj}_proj.bias", shape[:1]))
        return out

    def hf_tensors(self):
        """[(name, shape)] of the whole HF model in write order: embedding, layers, norm, head."""
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.num_layers):
            out += self.hf_layer_tensors(i)
        out.append(("model.norm.weight", (self.hidden,)))
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, self.hidden)))
        return out

    def hf_config(self, dtype_name: str, bos_token_id=None, eos_token_id=None):
        """config.json for LlamaForCausalLM (transformers 4.x reads rope_theta/rope_scaling,
        5.x rope_parameters; both are written and agree)."""
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_parameters = dict(self.rope_scaling, rope_theta=self.rope_theta)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.groups,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.eps,
            "max_position_embeddings": self.max_positions,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": rope_parameters,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.linear_bias,
            "attention_dropout": 0.0,
            "initializer_range": self.init_std,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": None,
            "use_cache": True,
            "torch_dtype": dtype_name,
            "dtype": dtype_name,
        }


def _check_supported(args):
    if not _get(args, "swiglu", default=False):
        raise ExportError(
            "the checkpoint was trained without --swiglu: a Llama MLP is SwiGLU (gate, up, down), "
            "so no Hugging Face Llama model computes the same function; refusing to export"
        )
    for names, ok, flag, why in _UNSUPPORTED:
        value = _get(args, *names)
        if value is not None and not ok(value):
            raise ExportError(
                f"the checkpoint was trained with {flag} {value!r}: {why}, so no Hugging Face Llama "
                "model computes the same function; refusing to export"
            )


def _rope(args):
    theta = float(_get(args, "rotary_base", default=10000))
    scaling = None
    if _get(args, "use_rope_scaling", default=False):
        # megatron-core's Llama 3.x scaling: only the factor is a flag; the rest are its constants.
        scaling = {"rope_type": "llama3", "factor": float(_get(args, "rope_scaling_factor", default=8.0)),
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
    interp = _get(args, "rotary_seq_len_interpolation_factor")
    if interp:
        if scaling:
            raise ExportError("the checkpoint uses both --use-rope-scaling and "
                              "--rotary-seq-len-interpolation-factor; HF Llama has one rope_scaling")
        scaling = {"rope_type": "linear", "factor": float(interp)}
    return theta, scaling


def _override(notes, name, flag, saved, given, fmt=repr):
    if given is None:
        return saved
    if saved is not None and given != saved:
        notes.append(f"{flag} {fmt(given)} overrides the checkpoint's {fmt(saved)}")
    elif saved is None:
        notes.append(f"{flag} {fmt(given)} (the checkpoint has no {name})")
    return given


def resolve_layout(args, iteration: int, overrides=None, sp_vocab_size=None):
    """See module docstring. ``sp_vocab_size``: pieces of the SentencePiece model given, if any."""
    overrides = dict(overrides or {})
    notes = []
    _check_supported(args)
    saved_arch = _get(args, "prores_arch")
    arch = _override(notes, "ProRes architecture", "--prores-arch", saved_arch or "pre",
                     overrides.get("prores_arch"))
    if arch in ARCH_REFUSALS:
        raise ExportError(
            f"--prores-arch {arch}: {ARCH_REFUSALS[arch]}, so no Hugging Face Llama model computes "
            "the same function; only pre (Pre-LN) and lns (LayerNorm Scaling) export exactly"
        )
    if arch not in ARCHS_EXPORTABLE:
        raise ExportError(f"--prores-arch {arch!r} is not a known architecture; exportable: {', '.join(ARCHS_EXPORTABLE)}")
    L, H = int(args.num_layers), int(args.hidden_size)
    heads = int(args.num_attention_heads)
    groups = int(args.num_query_groups) if _get(args, "group_query_attention") and _get(args, "num_query_groups") else heads
    head_dim = int(_get(args, "kv_channels") or H // heads)
    if heads % groups:
        raise ExportError(f"--num-query-groups {groups} does not divide --num-attention-heads {heads}")
    ffn = int(_get(args, "ffn_hidden_size"))
    padded = int(_get(args, "padded_vocab_size") or 0)

    vocab = _true_vocab(args, overrides.get("vocab_size"), sp_vocab_size, notes)
    if not padded:
        raise ExportError("the checkpoint's arguments have no padded_vocab_size")
    if vocab > padded:
        raise ExportError(f"vocabulary size {vocab} is larger than the checkpoint's embedding ({padded} rows)")
    multiple = int(_get(args, "make_vocab_size_divisible_by", default=128) or 1) * int(
        _get(args, "tensor_model_parallel_size", default=1) or 1)
    if -(-vocab // multiple) * multiple != padded:  # Megatron pads V up to a multiple of this
        notes.append(f"vocabulary size {vocab} would pad to {-(-vocab // multiple) * multiple} rows, but the "
                     f"embedding has {padded}: check --vocab-size / --tokenizer-model")

    theta, scaling = _rope(args)

    schedule, warmup = _prores_schedule(args, overrides, notes, L)
    step = overrides.get("step")
    start = int(_get(args, "prores_start_step", default=0) or 0)
    trained_step = prores_step(int(iteration), start)  # what the next training step would use
    samples = _get(args, "prores_warmup_samples")
    if samples is not None and overrides.get("prores_warmup_steps") is None:
        # --prores-warmup-samples: t is the samples consumed by the completed steps, which the
        # checkpoint's arguments hold (Megatron-LM saves consumed_train_samples with them).
        consumed = _get(args, "consumed_train_samples")
        if consumed is None:
            raise ExportError("the checkpoint trained with --prores-warmup-samples but its arguments have no "
                              "consumed_train_samples; pass --step S (samples) to choose alpha")
        trained_step = prores_step(int(consumed))
    if step is None:
        step = trained_step
        if samples is not None and overrides.get("prores_warmup_steps") is None:
            notes.append(f"--prores-warmup-samples {samples:g}: alpha at s = {step} consumed samples "
                         f"(iteration {iteration})")
        elif start:
            notes.append(f"--prores-start-step {start}: alpha at t = {iteration} - {start} = {step}")
    elif step != trained_step:
        notes.append(f"--step {step}: alpha at t={step}, not at the checkpoint's t={trained_step} "
                     f"(iteration {iteration})")
    layout = ExportLayout(
        num_layers=L, hidden=H, ffn=ffn, heads=heads, groups=groups, head_dim=head_dim,
        vocab=vocab, padded_vocab=padded,
        eps=float(_get(args, "layernorm_epsilon", "norm_epsilon", default=1e-5)),
        max_positions=int(_get(args, "max_position_embeddings") or _get(args, "seq_length")),
        rope_theta=theta, rope_scaling=scaling,
        tied=not _get(args, "untie_embeddings_and_output_weights", default=False),
        zero_centered_gamma=bool(_get(args, "layernorm_zero_centered_gamma", "apply_layernorm_1p", default=False)),
        qkv_bias=bool(_get(args, "add_qkv_bias", default=False)),
        linear_bias=bool(_get(args, "add_bias_linear", default=False)),
        init_std=float(_get(args, "init_method_std", default=0.02)),
        arch=arch, schedule=schedule, warmup_steps=warmup, iteration=int(iteration), step=int(step),
    )
    alphas = layout.alphas
    if needs_warmup_steps(schedule) and all(a == 0.0 for a in alphas):
        notes.append(f"alpha = 0 in every layer at t={step}: the exported model skips every layer "
                     "(embedding -> final norm -> head); pass --step to export a later point")
    return layout, notes


def _prores_schedule(args, overrides, notes, L):
    saved = _get(args, "prores_schedule")
    given = overrides.get("prores_schedule")
    if given is not None:
        try:
            given = canonical_schedule(given)
        except ValueError as err:
            raise ExportError(f"--prores-schedule: {err}") from None
    if saved is None and given is None:
        notes.append("the checkpoint has no ProRes settings: exporting it as a plain model (alpha = 1)")
    schedule = _override(notes, "ProRes schedule", "--prores-schedule", saved, given) or "none"
    schedule = canonical_schedule(schedule)
    warmup = _get(args, "prores_warmup_steps")
    if warmup is None and _get(args, "prores_warmup_samples") is not None:
        warmup = _get(args, "prores_warmup_samples")  # S: the warmup in samples, t = consumed samples
    if warmup is None and _get(args, "prores_total_warmup_steps") is not None and saved is not None:
        from ..core.schedules import warmup_steps_from_total

        warmup = warmup_steps_from_total(saved, args.prores_total_warmup_steps, L)
    warmup = _override(notes, "ProRes warmup length", "--prores-warmup-steps", warmup,
                       overrides.get("prores_warmup_steps"), fmt=lambda v: f"{v:g}")
    if needs_warmup_steps(schedule):
        if warmup is None:
            raise ExportError(f"--prores-schedule {schedule} needs --prores-warmup-steps (the checkpoint has none)")
        if not (warmup > 0 and math.isfinite(warmup)):
            raise ExportError(f"--prores-warmup-steps {warmup}: must be a positive, finite number of steps")
        end = total_warmup_steps(schedule, warmup, L)
        notes.append(f"ProRes: schedule {schedule}, T = {warmup:g}, every layer at alpha = 1 from step {end:g}")
    return schedule, (float(warmup) if warmup is not None else None)


def _true_vocab(args, given, sp_vocab_size, notes):
    """The tokenizer's vocabulary size V (not the padded embedding size)."""
    tokenizer_type = _get(args, "tokenizer_type")
    saved = _get(args, "vocab_size")
    if tokenizer_type not in (None, "NullTokenizer"):
        saved = None  # with a real tokenizer --vocab-size is not what sized the embedding
    if sp_vocab_size is not None:
        if given is not None and given != sp_vocab_size:
            raise ExportError(f"--vocab-size {given} disagrees with --tokenizer-model ({sp_vocab_size} pieces)")
        if saved is not None and saved != sp_vocab_size:
            notes.append(f"--tokenizer-model has {sp_vocab_size} pieces; the checkpoint's --vocab-size is {saved}")
        return int(sp_vocab_size)
    if given is not None:
        _override(notes, "vocabulary size", "--vocab-size", saved, given)
        return int(given)
    if saved:
        return int(saved)
    raise ExportError(
        f"the checkpoint does not record the true vocabulary size (tokenizer {tokenizer_type}); "
        "give --tokenizer-model (SentencePiece) or --vocab-size so the padding rows can be dropped"
    )

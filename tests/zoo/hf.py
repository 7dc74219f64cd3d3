"""Tiny Hugging Face transformers built from configs (random weights, no hub).

Every model: fp32, eval mode, ``use_cache=False``, seeded init, 2 layers and
4 attention heads unless stated otherwise.  Token inputs are ``(2, 8)`` int64.

Counting conventions for ``expect`` (see ``tests/zoo/case.py``):

* ``qk``: ONE group per attention module (per-KV-group channel sets are families inside it);
  the original per-head convention below is kept for reference only: no rotary -> one group per
  (layer, KV head): MHA ``L*H``, GQA/MQA
  ``L*KV``.  Rotary with a cos/sin table shared by all heads of a layer ->
  one group per layer (``L``), whatever H/KV are.
* ``vo``: one per attention module.
* ``ffn``: one per FFN.
"""

from __future__ import annotations

import functools

import transformers as tf

from .case import ZooCase, float_inputs, seeded, token_inputs

L = 2  # layers
H = 4  # attention heads
VOCAB = 96
SEQ = 8
BATCH = 2
INIT = 0.1  # larger than the usual 0.02 so attention is not uniform


def _build(model_cls, config_cls, attn: str, seed: int = 0, post=None, **cfg):
    def make():
        config = config_cls(**cfg)
        config._attn_implementation = attn
        if post is not None:
            post(config)
        return model_cls(config)

    return seeded(seed, make)


def _tok():
    return token_inputs(VOCAB, BATCH, SEQ)


def _case(
    name,
    model_cls,
    config_cls,
    *,
    attn="sdpa",
    expect,
    meta,
    notes,
    inputs=_tok,
    post=None,
    skipped_min=0,
    **cfg,
) -> ZooCase:
    return ZooCase(
        skipped_min=skipped_min,
        name=name,
        build=functools.partial(_build, model_cls, config_cls, attn, 0, post, **cfg),
        inputs=inputs,
        expect=expect,
        notes=notes,
        family="hf",
        meta=meta,
    )


def _meta(*, heads=H, kv_heads=H, head_dim, hidden, ffn, rotary, layers=L, **extra):
    return dict(
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=hidden,
        ffn=ffn,
        rotary=rotary,
        **extra,
    )


def _shape_note(m) -> str:
    return (
        f"L={m['layers']} H={m['heads']} KV={m['kv_heads']} head_dim={m['head_dim']} "
        f"hidden={m['hidden']} ffn={m['ffn']} rotary={m['rotary']}. "
    )


# --------------------------------------------------------------------------- cases


def _gpt2(name="hf_gpt2", attn="sdpa") -> ZooCase:
    m = _meta(head_dim=8, hidden=32, ffn=128, rotary=None)
    extra = {
        "sdpa": (
            " attn_implementation=sdpa. SURPRISE: torch.export works and matches, but "
            "ep.run_decompositions() FAILS in torch 2.13 ('Cannot view a tensor with shape [2,8,32] and "
            "strides (32,64,1) as (16,32)': the decomposed SDPA output is non-contiguous and Conv1D's "
            "x.view(-1, 32) then breaks). See hf_gpt2_eager for a decomposable variant."
        ),
        "eager": (
            " attn_implementation=eager: matmul(q, k^T) * scale, causal mask added, softmax, "
            "matmul(., v); "
            "decomposes fine."
        ),
    }[attn]
    return _case(
        name,
        tf.GPT2LMHeadModel,
        tf.GPT2Config,
        attn=attn,
        bos_token_id=0,
        eos_token_id=0,
        n_embd=32,
        n_layer=L,
        n_head=H,
        n_positions=32,
        vocab_size=VOCAB,
        use_cache=False,
        initializer_range=INIT,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "GPT-2: Conv1D weights stored [in,out] and applied via addmm(bias, x2d, W); c_attn is a "
            "fused [32, 96] Conv1D whose output is split(32, dim=2) into q|k|v then viewed to heads. "
            "No rotary (learned absolute positions) -> one qk group per head: 2*4 = 8. "
            "vo: c_attn v-slice columns <-> c_proj rows, 1/layer. ffn: c_fc columns <-> mlp.c_proj rows "
            "(n_inner = 4*32 = 128), 1/layer. lm_head tied to wte (not prunable channels)." + extra
        ),
    )


def _llama(name, kv) -> ZooCase:
    m = _meta(kv_heads=kv, head_dim=8, hidden=32, ffn=64, rotary="rotate_half, full head_dim")
    return _case(
        name,
        tf.LlamaForCausalLM,
        tf.LlamaConfig,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=kv,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        use_cache=False,
        initializer_range=INIT,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            f"Llama ({'MHA' if kv == H else f'GQA {H}q/{kv}kv'}): rotate_half RoPE with cos/sin of shape "
            "[B,S,head_dim] broadcast over heads -> all heads of a layer share one head-dim channel set "
            "(channels i and i+head_dim/2 are also paired by rotate_half) -> 1 qk group per layer = 2. "
            + ("GQA: k/v repeated via repeat_kv (expand+reshape) in sdpa path. " if kv != H else "")
            + "vo 1/layer; ffn: gate_proj & up_proj rows <-> down_proj cols (SwiGLU), 1/layer."
        ),
    )


def _mistral() -> ZooCase:
    m = _meta(kv_heads=2, head_dim=8, hidden=32, ffn=64, rotary="rotate_half, full head_dim")
    return _case(
        "hf_mistral",
        tf.MistralForCausalLM,
        tf.MistralConfig,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        sliding_window=None,
        use_cache=False,
        initializer_range=INIT,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m) + "Mistral = Llama GQA (4q/2kv) + SwiGLU; RoPE shared per layer -> qk 1/layer.",
    )


def _qwen2() -> ZooCase:
    m = _meta(kv_heads=2, head_dim=8, hidden=32, ffn=64, rotary="rotate_half, full head_dim")
    return _case(
        "hf_qwen2",
        tf.Qwen2ForCausalLM,
        tf.Qwen2Config,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        use_cache=False,
        use_sliding_window=False,
        initializer_range=INIT,
        tie_word_embeddings=False,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "Qwen2: GQA 4q/2kv with q/k/v biases (o_proj no bias): the q/k bias entries must be pruned "
            "with the rows. RoPE shared per layer -> qk 1/layer; vo 1/layer; SwiGLU ffn 1/layer."
        ),
    )


def _qwen3() -> ZooCase:
    m = _meta(
        kv_heads=2,
        head_dim=8,
        hidden=32,
        ffn=64,
        rotary="rotate_half, full head_dim",
        qk_norm="RMSNorm over head_dim, weight shared across heads",
    )
    return _case(
        "hf_qwen3",
        tf.Qwen3ForCausalLM,
        tf.Qwen3Config,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        use_cache=False,
        use_sliding_window=False,
        initializer_range=INIT,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "Qwen3: q_norm/k_norm are RMSNorms over head_dim applied per head after q_proj/k_proj and "
            "before RoPE. The RMS statistic is a mean of squares over head_dim; removed channels are 0 in "
            "the masked model, so keeping the original divisor (mean -> sum / head_dim) keeps it exact and the "
            "norm weight (shared across heads) is sliced with the channels: qk 1/layer (shared RoPE and norm "
            "weight tie all heads), vo 1/layer, SwiGLU ffn 1/layer."
        ),
    )


def _phi3() -> ZooCase:
    m = _meta(kv_heads=2, head_dim=8, hidden=32, ffn=64, rotary="rotate_half, full head_dim")
    return _case(
        "hf_phi3",
        tf.Phi3ForCausalLM,
        tf.Phi3Config,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        original_max_position_embeddings=64,
        use_cache=False,
        initializer_range=INIT,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        sliding_window=None,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "Phi-3: fused qkv_proj Linear(32 -> 4*8 + 2*2*8 = 64) sliced by static index "
            "[..., :32], [32:48], [48:64]; fused gate_up_proj Linear(32 -> 128) split by chunk(2) "
            "into gate|up, then up * silu(gate) -> down_proj. GQA 4q/2kv, RoPE shared per layer "
            "(partial_rotary_factor 1.0) -> qk 1/layer. vo 1/layer, ffn 1/layer (the gate and up "
            "halves of gate_up_proj rows are pruned together: row j and row 64+j)."
        ),
    )


def _neox() -> ZooCase:
    m = _meta(head_dim=8, hidden=32, ffn=64, rotary="rotate_half on first 4 of 8 dims (rotary_pct=0.5)")
    return _case(
        "hf_gpt_neox",
        tf.GPTNeoXForCausalLM,
        tf.GPTNeoXConfig,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=L,
        num_attention_heads=H,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rotary_pct=0.5,
        use_cache=False,
        initializer_range=INIT,
        use_parallel_residual=True,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "GPT-NeoX: fused query_key_value Linear(32 -> 96) viewed as [B,S,H,3*head_dim] and chunked "
            "on the last dim, i.e. q|k|v INTERLEAVED PER HEAD (rows h*24 + [0:8]=q_h, [8:16]=k_h, "
            "[16:24]=v_h). Partial rotary: rotate_half on dims [0:4] (pairs i,i+2), dims [4:8] pass "
            "through; cos/sin shared by all heads -> 1 qk group per layer = 2. (A finer discovery could "
            "treat the pass-through dims per head; we still expect the whole layer's qk to be one group "
            "because the per-head channel sets are forced equal on the rotary part.) Parallel residual "
            "x + attn(ln1 x) + mlp(ln2 x). vo 1/layer, ffn (dense_h_to_4h -> dense_4h_to_h, gelu) 1/layer."
        ),
    )


def _gptj() -> ZooCase:
    m = _meta(head_dim=16, hidden=64, ffn=128, rotary="interleaved (rotate_every_two) on first 8 of 16 dims")
    return _case(
        "hf_gptj",
        tf.GPTJForCausalLM,
        tf.GPTJConfig,
        bos_token_id=0,
        eos_token_id=0,
        n_embd=64,
        n_layer=L,
        n_head=H,
        rotary_dim=8,
        n_inner=128,
        n_positions=64,
        vocab_size=VOCAB,
        use_cache=False,
        initializer_range=INIT,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn="eager",
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "GPT-J: separate q/k/v (no bias). Interleaved rotary (rotate_every_two: pairs 2i,2i+1 via "
            "x[..., ::2], x[..., 1::2], stack, flatten) on the first rotary_dim=8 of head_dim=16; the "
            "sin/cos come from an embed_positions buffer gathered by position_ids and repeat_interleave'd; "
            "shared by all heads -> 1 qk group per layer = 2. Parallel block: x + attn(ln x) + mlp(ln x) "
            "with ONE shared ln_1. vo 1/layer, ffn (fc_in -> gelu_new -> fc_out) 1/layer. "
            "attn_implementation: eager (GPT-J has no sdpa path)."
        ),
    )


def _falcon() -> ZooCase:
    m = _meta(kv_heads=1, head_dim=8, hidden=32, ffn=128, rotary="rotate_half, full head_dim")
    return _case(
        "hf_falcon",
        tf.FalconForCausalLM,
        tf.FalconConfig,
        hidden_size=32,
        num_hidden_layers=L,
        num_attention_heads=H,
        vocab_size=VOCAB,
        new_decoder_architecture=False,
        multi_query=True,
        parallel_attn=True,
        alibi=False,
        bias=False,
        max_position_embeddings=64,
        use_cache=False,
        initializer_range=INIT,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "Falcon-7B style (new_decoder_architecture=False, multi_query=True): fused query_key_value "
            "Linear(32 -> 32 + 2*8 = 48) viewed [B,S,H+2,head_dim] and sliced into q (H heads), k, v "
            "(1 head each) - MQA (transformers <= 5.24: slice + list index, SDPA broadcasts K/V; 5.25: "
            "split([H, 1, 1], -2) leaving k a size-1 head axis, K/V repeated before SDPA). "
            "RoPE (alibi=False) shared per layer -> 1 qk group per layer "
            "(= 1 per KV head anyway). Parallel attn: x + attn(ln x) + mlp(ln x), one input_layernorm. "
            "vo 1/layer; ffn dense_h_to_4h -> gelu -> dense_4h_to_h (4*32=128), 1/layer."
        ),
    )


def _opt() -> ZooCase:
    m = _meta(head_dim=8, hidden=32, ffn=64, rotary=None)
    return _case(
        "hf_opt",
        tf.OPTForCausalLM,
        tf.OPTConfig,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=L,
        num_attention_heads=H,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        use_cache=False,
        init_std=INIT,
        do_layer_norm_before=True,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "OPT: separate biased q/k/v/out_proj, learned positions, no rotary -> qk one per head "
            "= 2*4 = 8 (q is scaled by head_dim**-0.5, a scalar mul). vo 1/layer; ffn fc1 -> relu -> "
            "fc2, 1/layer. Embedding positions use cumsum over attention_mask (all ones here)."
        ),
    )


def _bert() -> ZooCase:
    m = _meta(head_dim=8, hidden=32, ffn=64, rotary=None)
    return _case(
        "hf_bert",
        tf.BertModel,
        tf.BertConfig,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=L,
        num_attention_heads=H,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        type_vocab_size=2,
        initializer_range=INIT,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        use_cache=False,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "BertModel (post-norm encoder + pooler): biased q/k/v, absolute positions -> qk one per "
            "head = 8; vo (value -> attention.output.dense) 1/layer; ffn (intermediate.dense -> gelu -> "
            "output.dense) 1/layer. Pooler dense(32->32)+tanh reads the residual stream: not a group."
        ),
    )


def _vit_inputs():
    return float_inputs(BATCH, 3, 16, 16)


def _vit() -> ZooCase:
    m = _meta(head_dim=8, hidden=32, ffn=64, rotary=None, image=16, patch=8, tokens=5)
    return _case(
        "hf_vit",
        tf.ViTModel,
        tf.ViTConfig,
        inputs=_vit_inputs,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=L,
        num_attention_heads=H,
        image_size=16,
        patch_size=8,
        num_channels=3,
        initializer_range=INIT,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "ViTModel 16x16 image, 8x8 patches (Conv2d patch embed) + CLS = 5 tokens; pre-norm, "
            "biased q/k/v, no rotary -> qk one per head = 8; vo 1/layer; ffn 1/layer. "
            "Input: pixel_values float (2,3,16,16)."
        ),
    )


def _t5_inputs():
    (ids,) = token_inputs(VOCAB, BATCH, SEQ, seed=1234)
    (dec,) = token_inputs(VOCAB, BATCH, 6, seed=4321)
    return (ids, None, dec)


def _t5() -> ZooCase:
    m = _meta(
        head_dim=8,
        hidden=32,
        ffn=64,
        rotary=None,
        encoder_layers=2,
        decoder_layers=2,
        attention_modules="enc self x2, dec self x2, dec cross x2",
    )
    return _case(
        "hf_t5",
        tf.T5ForConditionalGeneration,
        tf.T5Config,
        attn="eager",
        inputs=_t5_inputs,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=L,
        num_decoder_layers=L,
        num_heads=H,
        vocab_size=VOCAB,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        use_cache=False,
        initializer_factor=1.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        feed_forward_proj="relu",
        expect={"qk": 3 * L, "vo": 3 * L, "ffn": 2 * L},
        meta=m,
        notes=_shape_note(m)
        + (
            "T5ForConditionalGeneration, inputs (input_ids[2,8], None, decoder_input_ids[2,6]). "
            "6 attention modules (2 enc self, 2 dec self, 2 dec cross), no bias, no qk scaling, "
            "relative position bias added to scores (per-head additive, does not touch head-dim) -> "
            "qk one per head per module = 6*4 = 24; vo one per module = 6 (cross-attn: v/k read the "
            "encoder output, q the decoder stream); ffn wi -> relu -> wo, one per block = 4. "
            "inner_dim = num_heads*d_kv = 32. tie_word_embeddings=True: lm_head shares `shared` and the "
            "decoder output is scaled by d_model**-0.5 first (not a group). attn_implementation eager "
            "(T5 has no sdpa path): matmul scores + position_bias, softmax, matmul with v."
        ),
    )


def _mixtral_post(config):
    config._experts_implementation = "batched_mm"


def _mixtral() -> ZooCase:
    m = _meta(kv_heads=2, head_dim=8, hidden=32, ffn=64, rotary="rotate_half, full head_dim", experts=4, top_k=2)
    return _case(
        "hf_mixtral",
        tf.MixtralForCausalLM,
        tf.MixtralConfig,
        post=_mixtral_post,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=None,
        use_cache=False,
        initializer_range=INIT,
        router_jitter_noise=0.0,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "Mixtral (config._experts_implementation='batched_mm'): experts are 3-D parameters "
            "gate_up_proj [E=4, 2*64, 32] and down_proj [E, 32, 64]; forward gathers per-token expert "
            "weights with gate_up_proj[expert_ids] (aten.index on a parameter), bmm, chunk(2) into "
            "gate|up, silu*mul, bmm with down_proj[expert_ids]; router = Linear(32->4) + softmax + topk. "
            "ffn expected 1/layer = 2: the intermediate axis is ONE tensor axis shared by all experts, "
            "so a dim-based discovery gives one group per layer (all experts keep the same channel "
            "index set). A per-expert discovery would give L*E = 8; either is defensible. Routing gathers "
            "whole expert rows (W[expert_ids]), which mixes no FFN channel; the expert axis itself stays "
            "whole (reported). GQA 4q/2kv with shared RoPE -> qk 1/layer; vo 1/layer."
        ),
    )


def _all() -> list[ZooCase]:
    return [
        _gpt2(),
        _gpt2("hf_gpt2_eager", "eager"),
        _llama("hf_llama_mha", H),
        _llama("hf_llama_gqa", 2),
        _mistral(),
        _qwen2(),
        _qwen3(),
        _phi3(),
        _neox(),
        _gptj(),
        _falcon(),
        _opt(),
        _bert(),
        _vit(),
        _t5(),
        _mixtral(),
    ]


HF_CASES: list[ZooCase] = _all()

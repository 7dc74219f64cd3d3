"""Tiny Hugging Face models of the current LLM families (issue 12): qk-norm in its RMS, per-projection and
centring forms, partial rotary at half of head_dim, clipped q/k/v, a squared-ReLU FFN, multi-head latent
attention (DeepSeek-V2/V3, MiniCPM3), routed experts through a grouped matmul (Qwen2-MoE), a depthwise
short convolution (LFM2) and a selective state-space scan (Mamba).

Same conventions as ``tests/zoo/hf.py`` (2 layers, 4 query heads, GQA 4q/2kv, head_dim 8, int64 ids
(2, 8), seeded random weights, no hub). What makes each exact is written in its notes.
"""

from __future__ import annotations

import transformers as tf

from .case import ZooCase
from .hf import INIT, VOCAB, H, L, _case, _meta, _shape_note

COMMON = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": L,
    "num_attention_heads": H,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "use_cache": False,
    "initializer_range": INIT,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _gemma3() -> ZooCase:
    m = _meta(
        kv_heads=2,
        head_dim=8,
        hidden=32,
        ffn=64,
        rotary="rotate_half, full head_dim",
        qk_norm="Gemma RMSNorm over head_dim, x * (1 + w)",
    )
    return _case(
        "hf_gemma3",
        tf.Gemma3ForCausalLM,
        tf.Gemma3TextConfig,
        **COMMON,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "Gemma3: q_norm/k_norm are RMSNorms over head_dim scaled by (1 + w); the mean of squares keeps its "
            "original divisor, the (1 + w) weight is sliced with the channels. Sliding and full attention "
            "layers, query_pre_attn_scalar pinned by SDPA's scale, GeGLU (gelu_pytorch_tanh) FFN."
        ),
    )


def _olmo2() -> ZooCase:
    m = _meta(
        kv_heads=2,
        head_dim=8,
        hidden=32,
        ffn=64,
        rotary="rotate_half, full head_dim",
        qk_norm="RMSNorm over the whole q / k projection",
    )
    return _case(
        "hf_olmo2",
        tf.Olmo2ForCausalLM,
        tf.Olmo2Config,
        **COMMON,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "OLMo2: q_norm/k_norm are RMSNorms over the whole projection (32 and 16 wide) before the view to "
            "heads; the weight follows the channels one to one, and whole heads keep the original divisor too."
        ),
    )


def _cohere() -> ZooCase:
    m = _meta(
        kv_heads=2,
        head_dim=8,
        hidden=32,
        ffn=64,
        rotary="interleaved, full head_dim",
        qk_norm="centring LayerNorm over head_dim, per-head weight [H, head_dim]",
    )
    return _case(
        "hf_cohere_qk_norm",
        tf.CohereForCausalLM,
        tf.CohereConfig,
        **COMMON,
        use_qk_norm=True,
        expect={"qk": 0, "vo": L, "ffn": L},
        meta=m,
        skipped_min=L,
        notes=_shape_note(m)
        + (
            "Cohere with use_qk_norm: a centring LayerNorm over head_dim (x - mean is not 0 where a channel "
            "was removed), so head_dim qk pruning is inexact and stays dense with that reason. Whole heads "
            "are exact: the per-head weight [H, head_dim] goes with its head (head granularity)."
        ),
    )


def _phi() -> ZooCase:
    m = _meta(kv_heads=2, head_dim=8, hidden=32, ffn=64, rotary="rotate_half on first 4 of 8 dims")
    return _case(
        "hf_phi",
        tf.PhiForCausalLM,
        tf.PhiConfig,
        **COMMON,
        partial_rotary_factor=0.5,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "Phi-2 style partial rotary at half of head_dim: a rotary pair spans every head, a pass-through "
            "channel one KV group; one per-head fill plans both (0 units were removed before). Parallel "
            "attention + MLP on one LayerNorm, biased projections, gelu_new FFN."
        ),
    )


def _olmo_clip() -> ZooCase:
    m = _meta(kv_heads=2, head_dim=8, hidden=32, ffn=64, rotary="rotate_half, full head_dim")
    return _case(
        "hf_olmo_clip_qkv",
        tf.OlmoForCausalLM,
        tf.OlmoConfig,
        **COMMON,
        clip_qkv=2.0,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "OLMo with clip_qkv: q, k, v clamped in place to [-2, 2] (clamp_ of 0 is 0: zero-preserving, "
            "decided by evaluating the op), non-parametric LayerNorms."
        ),
    )


def _nemotron() -> ZooCase:
    m = _meta(kv_heads=2, head_dim=8, hidden=32, ffn=64, rotary="rotate_half on first 4 of 8 dims")
    return _case(
        "hf_nemotron_relu2",
        tf.NemotronForCausalLM,
        tf.NemotronConfig,
        **COMMON,
        head_dim=8,
        partial_rotary_factor=0.5,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "Nemotron: squared-ReLU FFN down(relu(up(x))^2) (aten.pow / square from the pointwise registry), "
            "LayerNorm1P, partial rotary at half of head_dim."
        ),
    )


def _gpt_oss_post(config):
    config._experts_implementation = "batched_mm"  # the grouped_mm fallback has no ONNX translation


def _gpt_oss() -> ZooCase:
    m = _meta(kv_heads=2, head_dim=8, hidden=32, ffn=64, rotary="rotate_half (YaRN), full head_dim", experts=4)
    return _case(
        "hf_gpt_oss_sinks",
        tf.GptOssForCausalLM,
        tf.GptOssConfig,
        **COMMON,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        post=_gpt_oss_post,
        attn="eager",
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=_shape_note(m)
        + (
            "GPT-OSS: a learned per-head sink logit is concatenated to the attention scores (cat on the key "
            "axis, softmax, drop the sink column); the sink of head h goes with head h at head granularity and "
            "stays whole when head_dim channels go. Routed experts (3-D weights with biases, W[expert_ids], "
            "clamped SwiGLU with interleaved gate/up) lose the same FFN channels in every expert."
        ),
    )


MLA = {  # multi-head latent attention: low-rank q and kv, per-head nope + shared rotary key part
    "num_key_value_heads": H,  # MLA expands k and v to every head itself
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
}
MLA_NOTE = (
    "q = W_q_b(norm(W_q_a x)) per head [nope 8 | rotary 4]; W_kv_a x = [latent 16 | k_rot 4]; "
    "W_kv_b(norm(latent)) per head [k_nope 8 | v 8]; the key is built as new_empty + two slice copy_ "
    "(rewritten as cat([k_nope, k_rot expanded over heads])). qk groups: q_b's nope rows with kv_b's k_nope "
    "rows per head, q_b's rotary rows of every head with kv_a's k_rot rows (the shared key ties its channels "
    "across heads; pairs stay whole); vo: kv_b's v rows with o_proj's columns. The two latent ranks "
    "(W_q_a / W_kv_a rows through an RMSNorm into W_q_b / W_kv_b columns) are exact too, kind latent. "
)


def _mla_meta(rotary: str, **extra) -> dict:
    m = _meta(kv_heads=H, head_dim=12, hidden=32, ffn=64, rotary=rotary, **extra)
    m["attention"] = "MLA, 4 heads, qk 8+4 / v 8, latents 16/16"
    return m


def _deepseek_v3() -> ZooCase:
    m = _mla_meta("interleaved on the 4 shared key dims (rope_interleave)", experts=4)
    return _case(
        "hf_deepseek_v3",
        tf.DeepseekV3ForCausalLM,
        tf.DeepseekV3Config,
        **{**COMMON, **MLA},
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        post=_gpt_oss_post,
        expect={"qk": L, "vo": L, "ffn": 3, "latent": 2 * L},
        meta=m,
        notes=_shape_note(m)
        + "DeepSeek-V3 multi-head latent attention: "
        + MLA_NOTE
        + "ffn: the dense MLP of layer 0, the shared expert and the 4 routed experts (one index set) of layer 1.",
    )


def _deepseek_v2() -> ZooCase:
    m = _mla_meta("complex (view_as_complex pairs 2i, 2i+1) on the 4 shared key dims")
    return _case(
        "hf_deepseek_v2",
        tf.DeepseekV2ForCausalLM,
        tf.DeepseekV2Config,
        **{**COMMON, **MLA},
        first_k_dense_replace=L,
        n_routed_experts=4,
        moe_intermediate_size=16,
        expect={"qk": L, "vo": L, "ffn": L, "latent": 2 * L},
        meta=m,
        notes=_shape_note(m)
        + "DeepSeek-V2 multi-head latent attention with complex rotary: view_as_complex(x.reshape(..., -1, 2)) "
        "* freqs_cis then view_as_real: a complex element is the channel pair (2i, 2i+1), tied, and freqs_cis "
        "is gathered per kept pair. "
        + MLA_NOTE
        + "No ONNX export (the exporter has no complex ops, dense model included).",
    )


def _minicpm3() -> ZooCase:
    m = _mla_meta("rotate_half on the 4 shared key dims")
    return _case(
        "hf_minicpm3",
        tf.MiniCPM3ForCausalLM,
        tf.MiniCPM3Config,
        **{**COMMON, **MLA},
        expect={"qk": L, "vo": L, "ffn": L, "latent": 2 * L},
        meta=m,
        notes=_shape_note(m)
        + "MiniCPM3 multi-head latent attention with rotate_half rotary, scaled embeddings and residuals. "
        + MLA_NOTE,
    )


def _qwen2_moe() -> ZooCase:
    m = _meta(kv_heads=2, head_dim=8, hidden=32, ffn=16, rotary="rotate_half, full head_dim", experts=4)
    return _case(
        "hf_qwen2_moe",
        tf.Qwen2MoeForCausalLM,
        tf.Qwen2MoeConfig,
        **COMMON,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        expect={"qk": L, "vo": L, "ffn": 2 * L},
        meta=m,
        notes=_shape_note(m)
        + (
            "Qwen2-MoE with transformers' default experts (grouped matmul: rows sorted by expert, "
            "transformers::grouped_mm_fallback over the [E, in, out] bank with cumulative row counts, "
            "translated to ONNX as unrolled Slice/MatMul). Routed experts lose the same FFN channels in every "
            "expert (experts stay whole); the shared expert (sigmoid-gated) is an ordinary FFN. ffn: 2/layer."
        ),
    )


def _lfm2() -> ZooCase:
    m = _meta(
        kv_heads=2,
        head_dim=8,
        hidden=32,
        ffn=64,
        rotary="rotate_half, full head_dim",
        qk_norm="RMSNorm over head_dim",
        attention="GQA 4q/2kv (layer 0), short conv (layer 1)",
        recurrent_cache=True,  # its conv layers cache a window, not keys and values
    )
    return _case(
        "hf_lfm2",
        tf.Lfm2ForCausalLM,
        tf.Lfm2Config,
        **COMMON,
        layer_types=["full_attention", "conv"],
        block_auto_adjust_ff_dim=False,
        expect={"qk": 1, "vo": 1, "ffn": L + 1},
        meta=m,
        notes=_shape_note(m)
        + (
            "LFM2 hybrid: layer 1 is a gated short convolution, out(C * conv(B * x)) with B, C, x = "
            "in_proj(h).chunk(3) and a depthwise causal conv1d (groups == channels): channel c of the conv "
            "reads only channel c, so the three in_proj chunks, the filters and out_proj's columns are one "
            "ffn group (groups follows the kept count). ffn: one per MLP plus the conv."
        ),
    )


def _mamba() -> ZooCase:
    m = _meta(
        heads=0,
        kv_heads=0,
        head_dim=0,
        hidden=32,
        ffn=64,
        rotary=None,
        attention="state space (Mamba)",
        recurrent_cache=True,
    )
    return _case(
        "hf_mamba",
        tf.MambaForCausalLM,
        tf.MambaConfig,
        attn="eager",
        vocab_size=COMMON["vocab_size"],
        hidden_size=32,
        num_hidden_layers=L,
        state_size=4,
        expand=2,
        conv_kernel=4,
        time_step_rank=4,
        use_cache=False,
        initializer_range=COMMON["initializer_range"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        expect={"qk": L, "vo": L, "ffn": L},
        meta=m,
        notes=(
            "Mamba (selective scan, transformers' torch path): no attention, yet the algebra gives the same "
            "kinds. Inner channels (in_proj's x and z rows, the depthwise conv, A_log and D rows, x_proj's "
            "columns, dt_proj's rows, out_proj's columns) pass through the scan like v through attention "
            "(vo); the state channels (x_proj's B and C rows, A_log's columns) meet in the readout C . s like "
            "q . k (qk): the zero initial state new_zeros(B, D, N) is a gather site on both axes; the dt rank "
            "(x_proj rows into dt_proj columns) is an ffn."
        ),
    )


MODERN_CASES: list[ZooCase] = [
    _gemma3(),
    _olmo2(),
    _cohere(),
    _phi(),
    _olmo_clip(),
    _nemotron(),
    _gpt_oss(),
    _qwen2_moe(),
    _deepseek_v3(),
    _deepseek_v2(),
    _minicpm3(),
    _lfm2(),
    _mamba(),
]

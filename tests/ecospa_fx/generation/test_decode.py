"""``generate`` on compressed causal LMs: greedy tokens identical to Hugging Face ``generate`` on the dense
model with every removed index zeroed (its own cache), every causal LM of the zoo, batch 2 with left
padding, channel and head granularity (head: a representative subset
by default, all in the slow tier); the logits along the generated sequence agree within 1e-4."""

from __future__ import annotations

import copy

import pytest
import torch

import ecospa_fx
from ecospa_fx.errors import InputError
from ecospa_fx.generation.backends import TorchStepper
from ecospa_fx.generation.decode import GenerationStats, generate
from passes.verify import masked_copy
from tests.ecospa_fx.generation.conftest import CAUSAL_LMS, cached_model, compressed, left_padded_prompt
from tests.zoo import case_by_name

NEW_TOKENS = 8
# head granularity in the default tier: GQA, multi-query, sinks, latent attention, routed experts; every
# other causal LM of the zoo decodes at head granularity in the slow tier (CI time)
HEAD_IN_CI = {"hf_llama_gqa", "hf_falcon", "hf_gpt_oss_sinks", "hf_deepseek_v3", "hf_qwen2_moe"}
GREEDY_CASES = [
    pytest.param(
        name, granularity, marks=[pytest.mark.slow] if granularity == "head" and name not in HEAD_IN_CI else []
    )
    for name in CAUSAL_LMS
    for granularity in ("channel", "head")
]


@pytest.mark.parametrize(("name", "granularity"), GREEDY_CASES)
def test_greedy_tokens_match_hf_generate_on_masked_dense(name, granularity):
    model, small, masked = compressed(name, granularity)
    assert small.report.groups, "nothing was removed: the comparison would be vacuous"
    ids, mask = left_padded_prompt(model.get_input_embeddings().weight.shape[0])
    ours = generate(small, ids, NEW_TOKENS, attention_mask=mask, pad_token_id=0)
    theirs = masked.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    _logits_agree(small, masked, theirs, mask)


def _logits_agree(small, masked, sequence, prompt_mask) -> None:
    """One full forward of the generated sequence: compressed vs masked dense logits at real positions."""
    mask = torch.cat([prompt_mask, torch.ones(2, sequence.shape[1] - prompt_mask.shape[1], dtype=torch.long)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stepper = TorchStepper(small)
    ours, _ = stepper.step(sequence, mask, positions, stepper.empty_past(2))
    with torch.no_grad():
        theirs = masked(sequence, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-4


def test_kv_cache_shrinks_with_the_channels():
    _, small, _ = compressed("hf_llama_gqa", "channel")
    layout = small.ecospa_kv
    assert layout.n_layers == 2 and len(layout.shapes) == 4
    assert all(h == dh and d < dd for (h, d), (dh, dd) in zip(layout.shapes, layout.dense_shapes, strict=True))
    _, heads, _ = compressed("hf_llama_gqa", "head")
    assert all(h < dh for (h, _), (dh, _) in zip(heads.ecospa_kv.shapes, heads.ecospa_kv.dense_shapes, strict=True))


def test_decode_step_by_step_equals_one_full_forward():
    """Prefill + 1-token steps through the cache give the logits a single forward of the whole sequence gives."""
    _, small, _ = compressed("hf_qwen3", "channel")
    stepper = TorchStepper(small)
    ids = torch.randint(3, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    full, _ = stepper.step(ids, torch.ones_like(ids), torch.arange(9).expand(3, 9), stepper.empty_past(3))
    logits, past = stepper.step(
        ids[:, :5], torch.ones(3, 5, dtype=torch.long), torch.arange(5).expand(3, 5), stepper.empty_past(3)
    )
    steps = [logits]
    for t in range(5, 9):
        logits, past = stepper.step(
            ids[:, t : t + 1], torch.ones(3, t + 1, dtype=torch.long), torch.full((3, 1), t), past
        )
        steps.append(logits)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    _, small, _ = compressed("hf_llama_gqa", "channel")
    ids = torch.randint(3, 40, (2, 4), generator=torch.Generator().manual_seed(3))
    a = generate(small, ids, 6, do_sample=True, temperature=0.8, top_p=0.9, seed=5, eos_token_id=[])
    b = generate(small, ids, 6, do_sample=True, temperature=0.8, top_p=0.9, seed=5, eos_token_id=[])
    assert torch.equal(a, b)
    greedy = generate(small, ids, 6, eos_token_id=[])
    assert torch.equal(generate(small, ids, 6, do_sample=True, top_k=1, seed=9, eos_token_id=[]), greedy)


def test_eos_stops_and_pads_and_stats_are_filled():
    _, small, _ = compressed("hf_llama_gqa", "channel")
    ids = torch.randint(3, 40, (1, 4), generator=torch.Generator().manual_seed(3))
    free = generate(small, ids, 6, eos_token_id=[])
    stop = int(free[0, 5])  # the second new token
    stats = GenerationStats()
    out = generate(small, ids, 6, eos_token_id=stop, stats=stats)
    assert out.shape[1] == 6 and int(out[0, -1]) == stop
    assert stats.new_tokens == 2 and stats.prefill_s > 0 and len(stats.step_s) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0, "do_sample": True}, "temperature"),
        ({"top_p": 1.5, "do_sample": True}, "top_p"),
        ({"attention_mask": torch.zeros(1, 3, dtype=torch.long)}, "all zeros"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    _, small, _ = compressed("hf_llama_gqa", "channel")
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(InputError, match=match):
        generate(small, torch.ones(1, 3, dtype=torch.long), **args)


def test_a_model_without_cache_says_how_to_get_one():
    with pytest.raises(InputError, match="use_cache=True"):
        generate(torch.nn.Linear(2, 2), torch.ones(1, 3, dtype=torch.long), 2)
    with pytest.raises(InputError, match="integer tensor"):
        generate(compressed("hf_llama_gqa", "channel")[1], torch.ones(1, 3), 2)


def test_a_refit_kv_model_generates_what_the_dense_model_with_its_weights_does():
    """With calibration the kept W_o / W_down columns are refit (default): the KV graph then generates what
    the HF model carrying those columns, removed indices zeroed, generates."""
    model = cached_model("hf_llama_gqa")
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(3)
    calibration = [(torch.randint(3, vocab, (2, 8), generator=gen),) for _ in range(4)]
    small = ecospa_fx.compress(model, calibration[0], 0.5, calibration=calibration, refit_damp=0.01)
    report = small.report
    assert report.refit and report.max_abs_diff < 1e-4
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in report.refit:  # [hidden, in] weights that lost input columns: put the refit ones back
            full = reference.get_parameter(name.removeprefix("model."))
            gone = set(report.removed[(name, 1)])
            kept = [i for i in range(full.shape[1]) if i not in gone]
            full[:, kept] = small.get_parameter(name)
    removed = [(m.param.removeprefix("model."), m.dim, m.removed) for g in report.groups for m in g.members]
    masked = masked_copy(reference, removed)
    ids, mask = left_padded_prompt(vocab)
    ours = generate(small, ids, NEW_TOKENS, attention_mask=mask, pad_token_id=0)
    theirs = masked.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    _logits_agree(small, masked, theirs, mask)


def test_recurrent_cache_models_compress_without_a_cache_and_say_so(tmp_path):
    """Mamba's cache holds conv and state-space state, not keys and values: compress warns that it works
    without a cache, the result is exact, and generate says why it cannot run it."""
    model = cached_model("hf_mamba")
    ids = case_by_name("hf_mamba").inputs()[0]
    with pytest.warns(UserWarning, match="caches recurrent state"):
        small = ecospa_fx.compress(model, (ids,), 0.5)
    assert small.ecospa_report.max_abs_diff < 1e-4
    with pytest.raises(InputError, match="recurrent state"):
        generate(small, ids, 2)
    ecospa_fx.save(small, tmp_path)  # and it round-trips as a plain artifact (rebuilt without its cache)
    back = ecospa_fx.load(tmp_path)
    assert torch.equal(back(ids)["logits"], small(ids)["logits"])

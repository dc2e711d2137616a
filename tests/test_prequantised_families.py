"""Every family as mlx-community publishes it: a folder `mlx_lm.convert --quantize` wrote (4 bits
in groups of 64 or 32, a mixed-bit recipe, gpt-oss's MXFP4 experts or MXFP4 throughout) loads
through our stage loader as two pipeline stages in one process, each module quantised as
mlx_lm.load quantises it; the stages chained as the ranks chain them (stage 0 embeds and runs its
layers, stage 1 runs its own and the head) give mlx-lm's last-position logits and greedy tokens.
Then one mixed-bit mixture-of-experts folder on two real ranks."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_same_answer, assert_same_logits, greedy_reference, local_cluster
from test_quantize_families import as_stored_on_the_hub

from mlxdist.runtime.stage import Stage, load_stage
from mlxdist.serving.schedule import prefill_steps
from mlxdist.testing.families import family_names

QUESTION = "What is the capital of France?"
MAX_TOKENS = 8
SPLIT = [2, 2]

# variant -> (family, mlx_lm.convert's quantisation arguments). "deepseek_v3" is R1's format.
_FOUR_BITS = {"q_bits": 4, "q_group_size": 64}
VARIANTS = {f"{name}-4bit": (name, _FOUR_BITS) for name in [*family_names(), "deepseek_v3"]}
VARIANTS |= {
    "glm4_moe-4bit": ("glm4_moe", _FOUR_BITS | {"q_group_size": 32}),  # groups of 32 too
    # mlx-lm's mixed_3_6 recipe (as some mlx-community repos are made): 6 bits
    # for the head and some layers' v_proj/down_proj, 3 bits elsewhere.
    "glm4_moe-mixed_3_6": ("glm4_moe", _FOUR_BITS | {"quant_predicate": "mixed_3_6"}),
    "deepseek_v3-mixed_3_6": ("deepseek_v3", _FOUR_BITS | {"quant_predicate": "mixed_3_6"}),
    # gpt-oss-4bit above keeps the checkpoint's MXFP4 experts (as mlx-community's MXFP4-Q4 repos);
    # this one packs every matrix in MXFP4.
    "gpt_oss-mxfp4": ("gpt_oss", {"q_mode": "mxfp4", "q_group_size": 32}),
}


def make_source(family: str, out: Path) -> Path:
    """The family's tiny Hub-format checkpoint (R1's with FP8 weights, without the MTP layer,
    which mlx_lm.convert does not take)."""
    if family == "deepseek_v3":
        from mlxdist.testing.tiny_r1 import make_r1

        return make_r1(out, preset="tiny", overrides={"num_nextn_predict_layers": 0})
    from mlxdist.testing.make_model import make_model

    return as_stored_on_the_hub(make_model(family, out))


@pytest.fixture(scope="module")
def prequantised(tmp_path_factory):
    """variant -> (mlx_lm.convert's folder, mlx-lm's model and tokenizer on it, its answer),
    each made once for the module."""
    from mlx_lm import convert, load

    made = {}

    def get(variant: str):
        if variant not in made:
            family, settings = VARIANTS[variant]
            base = tmp_path_factory.mktemp(variant)
            folder = base / "mlx-community"
            convert(str(make_source(family, base / "hub")), str(folder), quantize=True, **settings)
            model, tokenizer = load(str(folder))
            reference = greedy_reference(model, tokenizer, QUESTION, MAX_TOKENS)
            made[variant] = folder, model, tokenizer, reference
        return made[variant]

    return get


def quantised_modules(model) -> dict[str, tuple]:
    """Each quantised module's path -> (class, bits, group size, mode)."""
    return {
        path: (type(m).__name__, m.bits, m.group_size, m.mode)
        for path, m in model.named_modules()
        if hasattr(m, "bits")
    }


def two_stages(folder: Path) -> list[Stage]:
    return [load_stage(folder, SPLIT, rank) for rank in range(len(SPLIT))]


def chained(stages: list[Stage], caches: list, tokens: list[int]) -> mx.array:
    """The last position's logits, tokens passed through the stages one after the other."""
    h = stages[0].embed(mx.array([tokens]))
    for stage, cache in zip(stages, caches):
        h = stage.forward(h, cache)
    return stages[-1].logits(h[:, -1, :])[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_stages_quantised_as_mlx_lm_load(prequantised, variant):
    """Together the two stages hold every quantised module mlx_lm.load makes, each with the
    same bits, group size and mode, and the variant's recipe shows in them."""
    folder, model, _, _ = prequantised(variant)
    theirs = quantised_modules(model)
    ours: dict[str, tuple] = {}
    for stage in two_stages(folder):
        ours |= quantised_modules(stage.model)
    assert ours == theirs
    kinds = {(bits, mode) for _, bits, _, mode in ours.values()}
    if "mixed" in variant:
        assert {(3, "affine"), (6, "affine")} <= kinds
    elif "mxfp4" in variant:  # everything but the router, which gpt-oss keeps at 8 bits
        attention = {v for k, v in ours.items() if ".self_attn." in k}
        assert attention and all(mode == "mxfp4" for *_, mode in attention)
    else:
        assert (4, "affine") in kinds
    if variant.startswith("gpt_oss"):
        experts = {v for k, v in ours.items() if k.endswith(".experts.down_proj")}
        assert experts and all(mode == "mxfp4" for *_, mode in experts)


@pytest.mark.parametrize("variant", VARIANTS)
def test_chained_stages_answer_as_mlx_lm(prequantised, variant):
    """Last-position logits within 1e-5 of mlx-lm's (one pass over the prompt, as the ranks
    answer /mlxdist/logits), then the same greedy tokens (the prompt fed in the ranks' steps)."""
    folder, _, tokenizer, (prompt, expected, expected_logits) = prequantised(variant)
    stages = two_stages(folder)
    logits = chained(stages, [stage.make_cache() for stage in stages], prompt)
    got = np.array(logits.astype(mx.float32))
    diff = float(np.max(np.abs(got - expected_logits)))
    print(f"{variant}: max |logit difference| = {diff:.3g}")
    assert got.shape == expected_logits.shape
    assert diff <= 1e-5

    caches = [stage.make_cache() for stage in stages]
    for piece, _ in prefill_steps(prompt):
        logits = chained(stages, caches, piece)
    tokens: list[int] = []
    while len(tokens) < MAX_TOKENS:
        # Greedy over log-probabilities, as mlx-lm and the last rank sample: in bfloat16 the
        # subtraction can tie two logits, and the first of them wins.
        token = int(mx.argmax(logits - mx.logsumexp(logits)).item())
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
        logits = chained(stages, caches, [token])
    print(f"{variant}: {tokens}")
    assert len(expected) >= 4, "the reference should produce a real answer"
    assert tokens == expected


@pytest.mark.cluster
def test_mixed_bit_moe_on_two_ranks(prequantised):
    """A GLM-4.5 (glm4_moe) folder with mixed 3/6-bit layers on two real ranks, split [2, 2]:
    mlx-lm's greedy tokens, and its logits within 1e-5."""
    folder, _, _, reference = prequantised("glm4_moe-mixed_3_6")
    with local_cluster(folder, SPLIT) as (url, health):
        label = f"glm4_moe mixed_3_6 split {health['split']}"
        assert_same_answer(url, reference, MAX_TOKENS, label)
        assert_same_logits(url, reference, label)

"""A request's sampling extras (logit bias, penalties, log probabilities, a grammar) checked and
put in the SamplingExtras the sampling rank applies (mlxdist/runtime/processors.py)."""

from __future__ import annotations

from mlxdist.runtime.processors import SamplingExtras
from mlxdist.serving.api.errors import APIError
from mlxdist.serving.grammar import GrammarError

BIAS_LIMIT = 100.0  # OpenAI's range for a logit bias, either way


def logit_bias(bias: dict[str, float] | None, vocab: int, param: str = "logit_bias") -> dict:
    """{token id as text: bias} -> {token id: bias}; 400 for anything else."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"{param}: the key {key!r} is not a token id", param) from None
        if not 0 <= token < vocab:
            raise APIError(
                400, f"{param}: token id {token} is outside the vocabulary (0..{vocab - 1})", param
            )
        if not -BIAS_LIMIT <= value <= BIAS_LIMIT:
            raise APIError(400, f"{param}: {value} for token {token} is outside -100..100", param)
        out[token] = float(value)
    return out


def make_extras(
    bias: dict[int, float] | None = None,
    presence: float = 0.0,
    frequency: float = 0.0,
    repetition: float = 1.0,
    top_logprobs: int | None = None,
    grammar: str | None = None,
    think_budget: tuple[int, int] | None = None,
) -> SamplingExtras | None:
    """None when nothing is asked beyond plain sampling (such a request may speculate).
    think_budget: (reasoning tokens at most, the </think> token that ends them)."""
    budget, end = think_budget or (None, None)
    extras = SamplingExtras(
        logit_bias=bias or {},
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
        top_logprobs=top_logprobs,
        grammar=grammar,
        think_budget=budget,
        think_end=end,
    )
    return None if extras == SamplingExtras() else extras


def refused(e: GrammarError, feature: str) -> APIError:
    """A grammar that cannot be enforced, as a 400 naming the request's feature."""
    param = e.param or feature
    message = e.message if e.message.startswith(feature) else f"{feature}: {e.message}"
    return APIError(400, message, param)

"""--kv-bits: whether mlx-lm's quantised KV cache can run a model, said in one line before any
rank starts (a rank would otherwise fail mid-answer with mlx-lm's own error)."""

from __future__ import annotations

from quantize.checkpoint import code_family

from .planner import KV_GROUP_SIZE, is_mla, kv_heads_and_dim

KV_BITS = (4, 8)


def kv_bits_refusal(config: dict) -> str | None:
    """Why this model cannot take a quantised KV cache, or None when it can."""
    family = config.get("model_type") or code_family(config)
    if is_mla(config):
        # mlx-lm's MLA attention multiplies by its cached rotary keys directly
        return f"{family}'s attention (DeepSeek's MLA) reads its KV cache unquantised in mlx-lm"
    if rotating_layers(config):
        return (
            f"{family} has sliding-window layers, whose rotating KV caches mlx-lm cannot quantise"
        )
    _, head_dim = kv_heads_and_dim(config)
    if head_dim % KV_GROUP_SIZE:
        return f"its attention heads of {head_dim} values do not divide into groups of 64"
    return None


def rotating_layers(config: dict) -> int:
    """How many layers the family's own make_cache gives a sliding window (a RotatingKVCache):
    read from the model built lazily, no weights (0 when it cannot be built here)."""
    from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

    from quantize.estimate import lazy_model

    try:
        caches = make_prompt_cache(lazy_model(config))
    except (ValueError, KeyError, TypeError, ImportError, AttributeError):
        return 0
    return sum(isinstance(c, RotatingKVCache) for c in caches)


def check_kv_bits(config: dict, kv_bits: int | None) -> None:
    """Raises ValueError, in one line, when kv_bits is given and the model cannot take it."""
    if kv_bits is None:
        return
    if kv_bits not in KV_BITS:
        raise ValueError(f"--kv-bits takes 4 or 8, not {kv_bits}")
    why = kv_bits_refusal(config)
    if why:
        raise ValueError(f"--kv-bits {kv_bits}: {why}; run it without --kv-bits")

"""The wired limit a rank sets before loading, as mlx-lm does (utils.maybe_set_recommended_wired_
limit): Metal's recommended working set, so the weights stay resident instead of being paged.
Without Metal (MLX on the CPU) there is nothing to set."""

from __future__ import annotations

from collections.abc import Mapping


def recommended_limit(metal: bool, info: Mapping) -> int | None:
    """The wired limit to set, in bytes: the device's recommended working set; None without
    Metal or without that figure."""
    size = info.get("max_recommended_working_set_size") if metal else None
    return int(size) if size else None


def set_recommended_wired_limit() -> int | None:
    """Sets the wired limit to the recommended working set where Metal is present; returns the
    limit set, or None (and changes nothing) without Metal. A raised iogpu.wired_limit_mb shows
    in the working set Metal reports, so it is honoured."""
    import mlx.core as mx

    limit = recommended_limit(mx.metal.is_available(), mx.device_info())
    if limit is not None:
        mx.set_wired_limit(limit)
    return limit

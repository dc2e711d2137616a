"""Which modules are quantised, and how: uniform settings, named recipes, per-pattern overrides.

A spec is a dict {"group_size", "bits", "mode"} as mlx-lm's `nn.quantize` predicates return it,
or None to keep a module unquantised.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import mlx.nn as nn

from .errors import UserError
from .mtp import PREFIX as MTP_PREFIX

Spec = dict | None

# Group size and bits each MLX quantisation mode takes when not given (as mlx-lm).
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}

# R1 recipes: routed experts, 96% of R1's weights, at low bits; attention, shared experts, the
# dense layers, embeddings and head, which every token reads, at 6 bits.
# The MTP layer (`--keep-mtp`, module paths `mtp.*`) has an entry of its own. It is quantised
# like a main layer, but its experts at 4 bits in both recipes: its drafts are checked by the
# main model, so its precision moves only the acceptance rate, on which every saved round trip
# depends; and it is one layer of 62 (R1: 4 bits instead of 3 cost 1.4 GB, on one node).
R1_MTP = {"experts": 4, "expert_down": 4, "other": 6}
R1_RECIPES = {
    "r1-4bit": {"experts": 4, "expert_down": 4, "other": 6, "mtp": R1_MTP},
    "r1-3bit": {"experts": 3, "expert_down": 4, "other": 6, "mtp": R1_MTP},
}
# mlx-lm's own mixed recipes, reused through mlx_lm.convert.mixed_quant_predicate_builder.
MLX_LM_RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
RECIPES = (*R1_RECIPES, *MLX_LM_RECIPES)


class RecipeError(UserError, ValueError):
    """Bad quantisation settings; the message says which and why."""


@dataclass(frozen=True)
class Override:
    pattern: str  # fnmatch pattern over module paths, e.g. "*.self_attn.*"
    spec: Spec


def parse_override(text: str, group_size: int, mode: str) -> Override:
    """'PATTERN=none', 'PATTERN=BITS', 'PATTERN=BITS:GROUP' or 'PATTERN=BITS:GROUP:MODE'."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern or not value:
        raise RecipeError(f"--override {text!r} must look like PATTERN=BITS[:GROUP[:MODE]]")
    if value.lower() in ("none", "no", "false", "16"):
        return Override(pattern, None)
    parts = value.split(":")
    try:
        bits = int(parts[0])
        group = int(parts[1]) if len(parts) > 1 else group_size
    except ValueError:
        raise RecipeError(f"--override {text!r}: bits and group size must be numbers") from None
    spec = {"group_size": group, "bits": bits, "mode": parts[2] if len(parts) > 2 else mode}
    check_spec(spec)
    return Override(pattern, spec)


def check_spec(spec: dict) -> None:
    mode, bits, group = spec["mode"], spec["bits"], spec["group_size"]
    if mode not in MODE_DEFAULTS:
        raise RecipeError(f"unknown quantisation mode {mode!r}: use {', '.join(MODE_DEFAULTS)}")
    if mode == "affine":
        if bits not in (2, 3, 4, 5, 6, 8):
            raise RecipeError(f"affine quantisation takes 2, 3, 4, 5, 6 or 8 bits, not {bits}")
        if group not in (32, 64, 128):
            raise RecipeError(f"affine quantisation takes group size 32, 64 or 128, not {group}")
    elif (group, bits) != MODE_DEFAULTS[mode]:
        g, b = MODE_DEFAULTS[mode]
        raise RecipeError(f"{mode} quantisation is {b} bits in groups of {g}")


def default_spec(bits: int | None, group_size: int | None, mode: str) -> dict:
    if mode not in MODE_DEFAULTS:
        raise RecipeError(f"unknown quantisation mode {mode!r}: use {', '.join(MODE_DEFAULTS)}")
    g, b = MODE_DEFAULTS[mode]
    spec = {"group_size": group_size or g, "bits": bits or b, "mode": mode}
    check_spec(spec)
    return spec


def r1_spec(path: str, recipe: str, group_size: int) -> dict:
    """The spec an R1 recipe gives a module path."""
    r = R1_RECIPES[recipe]
    if path.startswith(MTP_PREFIX):
        r = r["mtp"]
    if ".switch_mlp." in path:
        bits = r["expert_down"] if path.endswith("down_proj") else r["experts"]
    else:
        bits = r["other"]
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def as_main_path(path: str, num_layers: int) -> str:
    """An MTP module's path as if the layer were the model's own next layer, for predicates
    that read a layer number or a main module's name out of the path (mlx-lm's mixed recipes):
    `mtp.block.mlp.down_proj` -> `model.layers.<num_layers>.mlp.down_proj`."""
    rest = path.removeprefix(MTP_PREFIX)
    if rest.startswith("block."):
        return f"model.layers.{num_layers}.{rest.removeprefix('block.')}"
    main = {"embed_tokens": "model.embed_tokens", "shared_head.head": "lm_head"}.get(rest)
    return main or f"model.layers.{num_layers}.{rest}"


def make_predicate(
    model: nn.Module,
    default: dict,
    recipe: str | None = None,
    overrides: tuple[Override, ...] = (),
) -> Callable[[str, nn.Module], Spec]:
    """predicate(path, module) -> spec, for every module that can be quantised at all."""
    if recipe is not None and recipe not in RECIPES:
        raise RecipeError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    if recipe is not None and default["mode"] != "affine":
        raise RecipeError("recipes quantise in affine mode: leave --mode at affine")
    base: Callable[[str, nn.Module], Spec]
    if recipe in R1_RECIPES:

        def base(path, module):
            return r1_spec(path, recipe, default["group_size"])

    elif recipe in MLX_LM_RECIPES:
        from mlx_lm.convert import mixed_quant_predicate_builder

        base = mixed_quant_predicate_builder(recipe, model, default["group_size"])
    else:
        # The family's own choices where mlx-lm's model states them (Qwen3-MoE's router at
        # 8 bits), as mlx_lm.convert applies them.
        family = getattr(model, "quant_predicate", None)

        def base(path, module):
            choice = family(path, module) if family is not None else True
            if isinstance(choice, dict):
                return {"group_size": default["group_size"], "mode": "affine", **choice}
            return dict(default) if choice else None

    num_layers = len(getattr(model, "layers", ()))

    def predicate(path: str, module: nn.Module) -> Spec:
        if not hasattr(module, "to_quantized"):
            return None
        mtp = path.startswith(MTP_PREFIX) and recipe not in R1_RECIPES
        spec = base(as_main_path(path, num_layers) if mtp else path, module)
        for o in overrides:
            if fnmatch.fnmatchcase(path, o.pattern):
                spec = o.spec
        # As mlx-lm: a matrix whose rows do not divide into groups stays unquantised.
        if spec is None or module.weight.shape[-1] % spec["group_size"] != 0:
            return None
        return spec

    return predicate

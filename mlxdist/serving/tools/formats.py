"""Each tool-call format: where its calls begin and end in the output and how one is parsed.

DeepSeek's formats (R1-0528, V3.1, V3.2's DSML: deepseek.py) and Llama 3's bare JSON (llama.py)
are ours, mlx-lm having no parser for them; gpt-oss calls in harmony messages, which
serving/harmony.py splits; every other format is one of mlx-lm's tool parsers
(`mlx_lm.tool_parsers.<name>`), named as mlx-lm names them and found as mlx-lm finds them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from mlxdist.serving.tools import deepseek
from mlxdist.serving.tools.llama import LLAMA3_JSON

Parse = Callable[[str, "list[dict] | None"], list[dict]]

DEEPSEEK_R1, DEEPSEEK_V31, HARMONY = "deepseek_r1", "deepseek_v31", "harmony"
DEEPSEEK_V32 = "deepseek_v32"


@dataclass(frozen=True)
class Spec:
    """A format: its calls come in units from `start` to `end` (None: the end of the output),
    text outside them is content. With `call_start`/`call_end` a unit holds several calls, each
    between those markers and parsed alone as it completes; otherwise a unit is parsed whole."""

    name: str
    start: str
    end: str | None
    parse: Parse  # a unit's (or a call's) text inside its markers -> [{"name", "arguments"}]
    call_start: str | None = None
    call_end: str | None = None


def _one(parse_call: Callable[[str], dict]) -> Parse:
    return lambda text, tools: [parse_call(text)]


def _mlx_lm_parse(module: Any, name: str) -> Parse:
    def parse(text: str, tools: list[dict] | None) -> list[dict]:
        out = module.parse_tool_call(text, tools)
        calls = out if isinstance(out, list) else [out]
        # glm47 names a call it could not read "unknown", with the raw text as its argument.
        if name == "glm47" and any(c.get("name") == "unknown" for c in calls):
            raise ValueError("not a GLM tool call")
        return calls

    return parse


def spec_for(name: str) -> Spec | None:
    """The Spec of a format name tool_format() gives (None for harmony, llama3_json and
    unknown names)."""
    if name == DEEPSEEK_R1 or name == DEEPSEEK_V31:
        parse = deepseek.parse_r1_call if name == DEEPSEEK_R1 else deepseek.parse_v31_call
        return Spec(
            name,
            deepseek.CALLS_BEGIN,
            deepseek.CALLS_END,
            _one(parse),
            deepseek.CALL_BEGIN,
            deepseek.CALL_END,
        )
    if name == DEEPSEEK_V32:
        return Spec(
            name,
            deepseek.DSML_CALLS_BEGIN,
            deepseek.DSML_CALLS_END,
            _one(deepseek.parse_dsml_invoke),
            deepseek.DSML_INVOKE,
            deepseek.DSML_INVOKE_END,
        )
    if name in (HARMONY, LLAMA3_JSON) or not name.isidentifier():
        return None
    try:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    except ImportError:
        return None
    end = module.tool_call_end or None  # mistral's calls run to the end of the output
    return Spec(name, module.tool_call_start, end, _mlx_lm_parse(module, name))


def tool_format(chat_template: str | None, vocab: dict[str, int]) -> str | None:
    """The tool-call format a model speaks, read from its chat template (or vocabulary)."""
    template = chat_template if isinstance(chat_template, str) else ""
    if "｜DSML｜" in template:  # V3.2's template builds the markers from this piece
        return DEEPSEEK_V32
    if deepseek.CALL_BEGIN in template or (not template and deepseek.CALL_BEGIN in vocab):
        # R1-0528's template fences the arguments (```json), V3.1's does not.
        return DEEPSEEK_R1 if "```json" in template or not template else DEEPSEEK_V31
    if "<|channel|>" in template and "<|message|>" in template:
        return HARMONY
    if "<|start_header_id|>" in template and '"parameters": ' in template:
        return LLAMA3_JSON  # Llama 3.1-3.3 render a call as {"name": ..., "parameters": ...}
    try:
        from mlx_lm.tokenizer_utils import _infer_tool_parser
    except ImportError:
        return None
    probe = SimpleNamespace(chat_template=chat_template, get_vocab=lambda: vocab)
    return _infer_tool_parser(probe)

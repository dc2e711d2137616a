"""Tool calls: which format a model writes them in, the streaming splitter that finds them in
its answer, and the grammar that forces one. The pieces live in serving/tools/."""

from __future__ import annotations

from mlxdist.serving.tools.call import ToolCall
from mlxdist.serving.tools.formats import (
    DEEPSEEK_R1,
    DEEPSEEK_V31,
    DEEPSEEK_V32,
    HARMONY,
    tool_format,
)
from mlxdist.serving.tools.grammar import call_grammar
from mlxdist.serving.tools.llama import LLAMA3_JSON
from mlxdist.serving.tools.splitter import ToolCallSplitter

__all__ = [
    "DEEPSEEK_R1",
    "DEEPSEEK_V31",
    "DEEPSEEK_V32",
    "HARMONY",
    "LLAMA3_JSON",
    "ToolCall",
    "ToolCallSplitter",
    "call_grammar",
    "tool_format",
]

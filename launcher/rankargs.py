"""The rank entrypoint's flags for how the model is cut, shared by the agent and the ssh path."""

from __future__ import annotations


def mode_args(parallel: str, split: list[int], experts: list[int] | None = None) -> list[str]:
    """A pipeline rank's --split, or an expert rank's --parallel, --ranks and --experts."""
    if parallel == "pipeline":
        return ["--split", ",".join(str(n) for n in split)]
    args = ["--parallel", parallel, "--ranks", str(len(split))]
    return args + (["--experts", ",".join(str(n) for n in experts)] if experts else [])

"""One rank of tests/test_pipelined_prefill.py, started with MLX_RANK and MLX_HOSTFILE:

    python tests/pipelined_prefill_rank.py MODEL SPLIT PROMPT_JSON CHUNKS TOKENS

Every rank loads its layers into mlxdist's pipeline Runner; rank 0 feeds the prompt as
prefill_steps cuts it for each chunk size (sending each chunk on without waiting, as the server
does), once with the last step asking for logits and once for greedy tokens, and prints one JSON
line per chunk size: the last position's logits and the tokens."""

from __future__ import annotations

import json
import sys

import mlx.core as mx

from mlxdist.runtime.pipeline import Runner
from mlxdist.runtime.stage import load_stage
from mlxdist.runtime.step import LOGITS, SAMPLE, Step
from mlxdist.serving.schedule import prefill_steps


def last_logits(runner: Runner, prompt: list[int], chunk: int) -> list[float]:
    for tokens, flags in prefill_steps(prompt, chunk=chunk):
        if flags & SAMPLE:
            flags = flags & ~SAMPLE | LOGITS
        runner.send(tokens, Step(0, flags))
    return runner.receive().tolist()


def greedy(runner: Runner, prompt: list[int], chunk: int, count: int) -> list[int]:
    for tokens, flags in prefill_steps(prompt, chunk=chunk):
        runner.send(tokens, Step(0, flags))
    out = [runner.receive().item()]
    while len(out) < count:
        out.append(runner.step(out[-1:], Step(0, SAMPLE)).item())
    return out


def main() -> None:
    model, split, prompt = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    chunks, count = json.loads(sys.argv[4]), int(sys.argv[5])
    group = mx.distributed.init(strict=True, backend="ring")
    runner = Runner(load_stage(model, split, group.rank()), group)
    if group.rank() != 0:
        runner.serve()
        return
    for chunk in chunks:
        row = {"chunk": chunk, "steps": len(prefill_steps(prompt, chunk=chunk))}
        row["logits"] = last_logits(runner, prompt, chunk)
        row["tokens"] = greedy(runner, prompt, chunk, count)
        print(json.dumps(row), flush=True)
    runner.stop()


if __name__ == "__main__":
    main()

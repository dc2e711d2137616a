"""One rank of mlx-lm's own pipeline reading prompts, for prefill_vs_mlx_lm.py:

    MLX_RANK=r MLX_HOSTFILE=hosts.json python benchmarks/mlx_lm_prefill_rank.py MODEL PROMPTS_JSON

Loads the model with mlx-lm's `sharded_load(pipeline_group=...)`, warms up on a short prompt,
then for each prompt (a list of token ids) times stream_generate from the call to its first
token: every rank runs the same calls. Rank 0 prints one JSON line: the seconds of each prompt.
"""

from __future__ import annotations

import json
import sys
import time

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.utils import sharded_load


def first_token_seconds(model, tokenizer, prompt: list[int]) -> float:
    start = time.perf_counter()
    for _ in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=1):
        break
    return time.perf_counter() - start


def main() -> None:
    path, prompts = sys.argv[1], json.loads(sys.argv[2])
    group = mx.distributed.init(strict=True)
    # tiny-r1 has no remote code (R1 ships configuration_deepseek.py; mlx-lm asks for it)
    model, tokenizer, config = sharded_load(
        path,
        pipeline_group=group,
        tokenizer_config={"trust_remote_code": False},
        return_config=True,
    )
    if "quantization" not in config:  # MLX's CPU expert matmul runs only in float32, as ours
        model.set_dtype(mx.float32)
    first_token_seconds(model, tokenizer, prompts[0][:8])  # warm up
    seconds = [first_token_seconds(model, tokenizer, p) for p in prompts]
    if group.rank() == 0:
        print(json.dumps({"seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()

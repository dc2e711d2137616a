"""One rank of mlx-lm's own distributed generation, for compare_mlx_lm.py (run by mlx.launch).

    mlx.launch --backend ring -n 2 benchmarks/mlx_lm_rank.py MODEL pipeline|tensor TOKENS PROMPT_LEN

Loads the model with mlx-lm's `sharded_load` (a pipeline group or a tensor group), then on every
rank generates greedily from the same prompt of token ids. Rank 0 prints one JSON line: decode
tokens/s as mlx-lm's stream_generate reports it, and every rank's bytes sent over TCP per
decoded token (the kernel's socket counters), the prompt's share removed by a second run that
answers one token.
"""

from __future__ import annotations

import json
import os
import random
import sys

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.utils import sharded_load

sys.path.insert(0, os.path.dirname(__file__))
from tcp_bytes import tcp_bytes_sent  # noqa: E402


def bytes_sent() -> int:
    return tcp_bytes_sent(os.getpid())


def generate(model, tokenizer, prompt: list[int], tokens: int) -> float:
    tps = 0.0
    for response in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=tokens):
        tps = response.generation_tps
    return tps


def main() -> None:
    path, mode, tokens, prompt_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    group = mx.distributed.init(strict=True)
    groups = {"pipeline_group": group} if mode == "pipeline" else {"tensor_group": group}
    # tiny-r1 has no remote code (R1 ships configuration_deepseek.py; mlx-lm asks for it)
    model, tokenizer, config = sharded_load(
        path, **groups, tokenizer_config={"trust_remote_code": False}, return_config=True
    )
    if "quantization" not in config:  # MLX's CPU expert matmul runs only in float32, as ours
        model.set_dtype(mx.float32)
    # mlx-lm stops at the end-of-sequence ids: none of them, for a fixed number of tokens
    tokenizer._eos_token_ids = set()
    vocab = model.args.vocab_size
    rng = random.Random(0)
    prompt = [rng.randrange(16, vocab) for _ in range(prompt_len)]
    generate(model, tokenizer, prompt[:8], 4)  # warm up
    start = bytes_sent()
    generate(model, tokenizer, prompt, 1)
    middle = bytes_sent()
    tps = generate(model, tokenizer, prompt, tokens)
    end = bytes_sent()
    per_token = ((end - middle) - (middle - start)) / max(1, tokens - 1)
    sent = mx.distributed.all_gather(mx.array([per_token]), group=group)
    mx.eval(sent)
    if group.rank() == 0:
        print(json.dumps({"decode_tps": tps, "bytes_per_token": sent.tolist()}), flush=True)


if __name__ == "__main__":
    main()

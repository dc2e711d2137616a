"""Whether a model folder can draft with an MTP layer, and the one line that says what to do."""

from __future__ import annotations

import pytest

from quantize.mtp import mtp_problem

R1 = {"model_type": "deepseek_v3", "num_hidden_layers": 61, "num_nextn_predict_layers": 1}
MAIN = ["model.embed_tokens.weight", "model.layers.60.mlp.gate.weight", "lm_head.weight"]


@pytest.mark.parametrize(
    "config, names, says",
    [
        (R1, [*MAIN, "mtp.eh_proj.weight"], None),  # quantize --keep-mtp's folder
        (R1, [*MAIN, "model.layers.61.eh_proj.weight"], None),  # R1's own format
        (R1, MAIN, "quantize --keep-mtp"),  # converted without the layer
        ({**R1, "num_nextn_predict_layers": 0}, MAIN, "num_nextn_predict_layers is 0"),
        ({"model_type": "kimi_k2", "num_hidden_layers": 61}, MAIN, "no MTP layer"),
        ({"model_type": "glm4_moe", "num_nextn_predict_layers": 1}, MAIN, "not glm4_moe's"),
        ({"model_type": "llama", "num_hidden_layers": 2}, MAIN, "--speculative ngram"),
    ],
)
def test_mtp_problem(config, names, says):
    problem = mtp_problem(config, names)
    if says is None:
        assert problem is None
    else:
        assert says in problem and "\n" not in problem

"""quantize/light_mlx_lm.py: the runtime imports mlx-lm's models without transformers, and
mlx_lm reads as before; get_classes and infer_quant_config answer as mlx_lm.utils' own."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import mlx_lm.utils as utils
import pytest

from quantize.light_mlx_lm import _compile_parts

# In a fresh interpreter: what a rank without a tokenizer imports, then what others read.
_PROBE = """
import json, sys
import mlxdist.runtime.expert, mlxdist.runtime.lockstep, mlxdist.runtime.pipeline
import mlxdist.runtime.stage
from mlxdist.runtime.stage import build_model
heavy = ("transformers", "mlx_lm.utils", "mlx_lm.tokenizer_utils")
light = sorted(m for m in heavy if m in sys.modules)
from mlx_lm import convert, generate, load
import mlx_lm
print(json.dumps({
    "light": light,
    "names": [f.__module__ + "." + f.__name__ for f in (convert, generate, load)],
    "version": mlx_lm.__version__,
    "after": "transformers" in sys.modules,
}))
"""


def _run(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_runtime_imports_no_transformers_and_mlx_lm_reads_as_before():
    seen = _run(_PROBE)
    assert seen["light"] == []
    # the package's own names are its functions, not the submodules of the same name
    assert seen["names"] == [
        "mlx_lm.convert.convert",
        "mlx_lm.generate.generate",
        "mlx_lm.utils.load",
    ]
    assert seen["version"] == mlx_lm.__version__
    assert seen["after"]


def test_what_mlx_lm_init_imports_is_there_when_read_first():
    code = (
        "import json, mlxdist.runtime, mlx_lm; "
        "print(json.dumps([mlx_lm.models.cache.KVCache.__name__, mlx_lm.__all__]))"
    )
    assert _run(code) == ["KVCache", list(mlx_lm.__all__)]


def test_compiled_parts_equal_mlx_lm_utils():
    parts = _compile_parts()
    assert parts["MODEL_REMAPPING"] == utils.MODEL_REMAPPING
    assert parts["MODEL_ARCHITECTURE_REMAPPING"] == utils.MODEL_ARCHITECTURE_REMAPPING
    configs = [{"model_type": t} for t in utils.MODEL_REMAPPING]
    configs += [
        {"model_type": t, "architectures": [a]} for t, a in utils.MODEL_ARCHITECTURE_REMAPPING
    ]
    configs += [{"model_type": t} for t in ("deepseek_v3", "llama", "qwen3_moe", "gpt_oss")]
    for config in configs:
        try:
            want = utils._get_classes(config)
        except ValueError as e:  # a module this mlx-lm lacks: the same refusal
            with pytest.raises(ValueError, match=str(e)):
                parts["_get_classes"](config)
            continue
        assert parts["_get_classes"](config) == want, config


@pytest.mark.parametrize(
    "bits, group_size, mode", [(4, 64, "affine"), (8, 32, "affine"), (4, 32, "mxfp4")]
)
def test_infer_quant_config_equals_mlx_lm(bits, group_size, mode):
    layer = nn.Linear(128, 64)
    w, scales, *_ = mx.quantize(layer.weight, group_size=group_size, bits=bits, mode=mode)
    weights = {"q.weight": w, "q.scales": scales}
    got = _compile_parts()["infer_quant_config"]("q", layer, weights)
    assert got == utils.infer_quant_config("q", layer, weights)
    assert (got["bits"], got["group_size"], got["mode"]) == (bits, group_size, mode)

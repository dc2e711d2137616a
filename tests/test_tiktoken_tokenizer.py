"""A model folder with Kimi K2's tokenizer files (tiktoken.model and tokenizer_config.json, no
tokenizer.json): the fast tokenizer built from them gives tiktoken's own ids with Kimi's split
pattern, decodes back, renders the chat template, and serves a chat on 2 real ranks whose
answer is one mlx-lm process's on the same ids."""

from __future__ import annotations

import base64
import collections
import json
from pathlib import Path

import httpx
import pytest
import regex
import tiktoken
from conftest import family_model, greedy_reference, local_cluster

from mlxdist.runtime.tiktoken_tokenizer import KIMI_PATTERN, load_tokenizer, tiktoken_only
from mlxdist.testing.families import FAMILIES

# tokenization_kimi.py's pat_str as the repo writes it, to hold the module's pattern to:
# https://huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/tokenization_kimi.py
KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

CORPUS = (
    "The capital of France is Paris. It's what they've said; we'll see what I'd do.\n"
    "我们的模型在多台电脑上运行。今天天气很好，我们去公园吧。北京是中国的首都。\n"
    "Numbers: 12345 and 2026-11-30, 3.14159.\n\n"
    "    def double(x):\n        return x * 2\n\tTabs\tand   spaces.\n"
)
# What the ranks learn from: the corpus and frequent words, so that merges of every kind come first.
TRAINING = (
    CORPUS
    + "the capital and the city of France " * 4
    + "我们的首都 中国的首都 " * 4
    + "2026 123 " * 4
)
MERGES = 200  # at most: learning stops at the first pair seen only once

# Kimi-style named special tokens by offset past the ranks (the real repo's layout: [BOS] and
# [EOS] first, chat markers, tool-call markers that are not special); the rest are reserved.
NAMED = {
    0: ("[BOS]", True),
    1: ("[EOS]", True),
    2: ("<|im_end|>", True),
    3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True),
    9: ("[EOT]", True),
    10: ("<|im_system|>", True),
    11: ("<|tool_calls_section_begin|>", False),
    12: ("<|tool_calls_section_end|>", False),
    17: ("<|im_middle|>", True),
    22: ("<think>", True),
    23: ("</think>", True),
    254: ("[UNK]", True),
    255: ("[PAD]", True),
}
SLOTS = 258


def learn_ranks(text: str, merges: int) -> dict[bytes, int]:
    """Byte-level BPE ranks as tiktoken stores them: the 256 bytes, then each merge learned
    from text (pre-split with Kimi's pattern), most frequent pair first."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode()] for w in regex.findall(KIMI_PAT_STR, text, regex.V1)]
    for _ in range(merges):
        pairs = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), count = pairs.most_common(1)[0]
        if count < 2:  # a pair seen once would merge a whole rare word
            break
        ranks.setdefault(a + b, len(ranks))  # one token may come of two different pairs
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if w[i : i + 2] == [a, b]:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(out)
        words = merged
    return ranks


RANKS = learn_ranks(TRAINING, MERGES)
N = len(RANKS)
IDS = {name: N + offset for offset, (name, _) in NAMED.items()}
SPECIALS = {
    NAMED[i][0] if i in NAMED else f"<|reserved_token_{N + i}|>": N + i for i in range(SLOTS)
}


def write_kimi_tokenizer(folder: Path, chat_template: str, in_jinja: bool = False) -> None:
    """tiktoken.model and tokenizer_config.json as Kimi K2's repos have them (auto_map to
    code we do not ship: it must never be needed)."""
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in RANKS.items())
    (folder / "tiktoken.model").write_text("".join(lines))
    decoder = {
        str(N + i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False}
        | {"single_word": False, "special": special}
        for i, (name, special) in NAMED.items()
    }
    config = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }
    if in_jinja:
        (folder / "chat_template.jinja").write_text(chat_template)
    else:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


TEMPLATE = FAMILIES["kimi_k2"].chat_template
TEXTS = [
    "The capital of France is Paris.",
    "我们的模型在多台电脑上运行。北京是中国的首都",
    "中文English混合mixed文本",
    "It's THEY'VE we'll I'd You'RE",
    "12345678 2026-11-30 3.14159",
    "a  b   c\t\td",
    "line one\n\nline two\r\n\r\n   \n",
    "    return x * 2\n",
    "trailing spaces   ",
    "über Größe Ñandú café",
    "emoji 🦊🦊 ok",
    "<|im_user|>user<|im_middle|>hi<|im_end|>[EOS]",
    f"x<|reserved_token_{N + 100}|>y",
    "<|tool_calls_section_begin|>call<|tool_calls_section_end|>",
    CORPUS,
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kimi-tokenizer")
    write_kimi_tokenizer(path, TEMPLATE)
    return path


@pytest.fixture(scope="module")
def wrapper(folder):
    """What rank 0 loads for the folder, with <|im_end|> as an end token as generation
    config would name it."""
    return load_tokenizer(folder, eos_token_ids=[IDS["<|im_end|>"]])


@pytest.fixture(scope="module")
def encoding():
    """tiktoken's own encoding with Kimi's pattern, ranks and special tokens."""
    return tiktoken.Encoding(
        "kimi", pat_str=KIMI_PAT_STR, mergeable_ranks=RANKS, special_tokens=SPECIALS
    )


def test_pattern_is_kimis_own():
    assert KIMI_PATTERN == KIMI_PAT_STR


def test_the_ranks_have_merges_of_every_kind(encoding):
    """The corpus gave merges for English, Han and digits, so the table tests BPE, not bytes."""
    assert sorted(RANKS.values()) == list(range(N))
    for part in ("The capital of France is Paris.", "我们的模型在多台电脑上运行", "12345 2026"):
        assert len(encoding.encode(part)) < len(part.encode()), part


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_ids_are_tiktokens_and_decode_back(wrapper, encoding, text):
    ids = wrapper.encode(text, add_special_tokens=False)
    assert ids == encoding.encode(text, allowed_special="all")
    assert wrapper.decode(ids) == text


def test_special_tokens_take_kimis_ids(wrapper):
    for name, i in IDS.items():
        assert wrapper.convert_tokens_to_ids(name) == i
    reserved = f"<|reserved_token_{N + 5}|>"
    assert wrapper.convert_tokens_to_ids(reserved) == N + 5
    assert (wrapper.bos_token, wrapper.eos_token) == ("[BOS]", "[EOS]")
    assert (wrapper.unk_token, wrapper.pad_token) == ("[UNK]", "[PAD]")
    # As tokenizer_config.json says: chat markers are special, tool-call markers are not.
    ids = [IDS["<|im_end|>"], IDS["<|tool_calls_section_begin|>"]]
    assert wrapper.decode(ids, skip_special_tokens=True) == "<|tool_calls_section_begin|>"
    assert len(wrapper.get_vocab()) == N + SLOTS


def test_end_tokens_are_eos_and_those_passed(wrapper):
    assert wrapper.eos_token_ids == {IDS["[EOS]"], IDS["<|im_end|>"]}


def test_chat_template_renders_with_kimis_markers(wrapper, encoding):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = wrapper.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI."
        "<|im_end|><|im_user|>user<|im_middle|>What is the capital of France?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    ids = wrapper.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == encoding.encode(text, allowed_special="all")


def test_streaming_detokenizer_gives_the_text(wrapper, encoding):
    text = "北京 is the capital; 12345 🦊!"
    detok = wrapper.detokenizer
    detok.reset()
    for token in encoding.encode(text):
        detok.add_token(token)
    detok.finalize()
    assert detok.text == text


def test_chat_template_jinja_file_is_read(tmp_path):
    write_kimi_tokenizer(tmp_path, "{{ '<|im_user|>' + messages[0]['content'] }}", in_jinja=True)
    tokenizer = load_tokenizer(tmp_path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_user|>hi"


def test_only_a_folder_without_tokenizer_json_is_built_here(tmp_path, folder):
    assert tiktoken_only(folder)
    (tmp_path / "tiktoken.model").write_text("")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert not tiktoken_only(tmp_path)


def test_a_broken_tiktoken_model_names_its_line(tmp_path):
    write_kimi_tokenizer(tmp_path, TEMPLATE)
    with open(tmp_path / "tiktoken.model", "a") as f:
        f.write("not-base64!! 7\n")
    with pytest.raises(ValueError, match=rf"line {N + 1} is not a base64 token and a rank"):
        load_tokenizer(tmp_path)


def test_quantize_fetches_kimis_tokenizer_files_and_not_its_code():
    from huggingface_hub.utils import filter_repo_objects

    from quantize.source import DEFAULT_PATTERNS

    listing = ["tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "config.json"]
    listing += ["tokenization_kimi.py", "configuration_deepseek.py", "modeling_deepseek.py"]
    picked = set(filter_repo_objects(listing, allow_patterns=DEFAULT_PATTERNS))
    assert picked == set(listing[:4])


@pytest.mark.cluster
def test_two_ranks_chat_on_kimis_tokenizer_files(tmp_path, encoding):
    """make-model's kimi_k2 checkpoint with its tokenizer.json swapped for Kimi's files: a chat
    on 2 ranks answers with one mlx-lm process's greedy tokens on tiktoken's prompt ids."""
    ends = {"bos_token_id": IDS["[BOS]"], "eos_token_id": IDS["[EOS]"]}
    path, model, _ = family_model("kimi_k2", tmp_path / "kimi", {"vocab_size": 640, **ends})
    (path / "tokenizer.json").unlink()
    write_kimi_tokenizer(path, TEMPLATE)
    generation = {**ends, "eos_token_id": [IDS["[EOS]"], IDS["<|im_end|>"]]}
    (path / "generation_config.json").write_text(json.dumps(generation))
    tokenizer = load_tokenizer(path, eos_token_ids=generation["eos_token_id"])
    question = "What is the capital of France?"
    prompt, expected, _ = greedy_reference(model, tokenizer, question, 8)
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == encoding.encode(text, allowed_special="all")
    assert len(expected) >= 4, "the reference should produce a real answer"

    body = {"messages": messages, "max_tokens": 8}
    with local_cluster(path, [2, 2]) as (url, _):
        answer = httpx.post(
            url + "/v1/chat/completions",
            json=body | {"temperature": 0.0, "return_token_ids": True},
            timeout=300,
        ).json()
    assert answer["usage"]["prompt_tokens"] == len(prompt)
    assert answer["choices"][0]["token_ids"] == expected

"""Hugging Face repo ids in launch, serve, bench and plan: the real `mlxdist` command against
the loopback Hub and a hand-written Hugging Face cache (tests/hub.py), never the network."""

from __future__ import annotations

import json
import socket

import pytest
from conftest import rank_pids, run_cli
from hub import COMMIT, REPO, cached_files, model_files, running_hub, write_hf_cache

# Nothing from the user's own Hugging Face setup, and no telemetry or progress bars.
QUIET = {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": ""}


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def offline_env(cache) -> dict[str, str]:
    # A Hub that refuses every connection as well: offline must not even try.
    return QUIET | {
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": closed_port_url(),
    }


def one_error_line(result) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and result.stderr.splitlines()[-1] == lines[0], result.stderr
    return lines[0]


@pytest.fixture
def hub(tiny_r1):
    with running_hub({REPO: model_files(tiny_r1)}) as hub:
        yield hub


def plan_json(model: str, env: dict | None = None) -> dict:
    result = run_cli("plan", model, "--simulate", "2x192GB", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_plan_of_a_repo_reads_only_its_config_and_index(tmp_path, tiny_r1, hub):
    cache = tmp_path / "cache"
    env = QUIET | {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": hub.url}
    planned = plan_json(f"{REPO}@{COMMIT}", env)
    wanted = {"config.json", "model.safetensors.index.json"}
    assert hub.fetched() == wanted
    assert hub.ranges == []  # tiny-r1 is planned at --bits: not even a header is read
    assert not [r for r in hub.requests if ".safetensors/" in r or r.endswith(".safetensors")]
    assert cached_files(cache) == wanted
    local = plan_json(str(tiny_r1))
    assert planned["model"] == REPO and local["model"] == tiny_r1.name
    assert planned == local | {"model": REPO}
    # Again with the Hub gone: planned from the cache it just filled.
    assert plan_json(f"{REPO}@{COMMIT}", offline_env(cache)) == planned


@pytest.mark.parametrize(
    "command",
    [
        ["launch", "{model}", "--local", "2", "--prompt", "hi"],
        ["serve", "{model}"],
        ["bench", "{model}"],
        ["plan", "{model}", "--simulate", "2x192GB"],
    ],
    ids=["launch", "serve", "bench", "plan"],
)
def test_a_bad_repo_id_is_one_line(tmp_path, command):
    model = "org/tiny r1@main"
    result = run_cli(*[a.format(model=model) for a in command], env=offline_env(tmp_path))
    assert one_error_line(result) == (
        f"error: {model} is not a Hugging Face repo id (org and name take letters, digits, "
        "'-', '_' and '.'): give org/name or org/name@revision (a branch, tag or commit)"
    )


def test_an_unknown_repo_is_one_line(tmp_path, hub):
    env = QUIET | {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": hub.url}
    result = run_cli("plan", "org/missing", "--simulate", "2x192GB", env=env)
    assert one_error_line(result) == (
        "error: org/missing is neither a local path nor a Hugging Face repo you can access: "
        "check the spelling, or log in with `hf auth login` if it is private"
    )
    result = run_cli("launch", f"{REPO}@v9", "--local", "2", "--prompt", "hi", env=env)
    assert one_error_line(result) == (
        "error: org/tiny-r1@v9: the Hugging Face repo has no such revision"
    )
    assert cached_files(tmp_path) == set()


def test_offline_and_not_in_the_cache_is_one_line(tmp_path):
    result = run_cli("launch", REPO, "--local", "2", "--prompt", "hi", env=offline_env(tmp_path))
    assert one_error_line(result) == (
        "error: org/tiny-r1 is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
        "download it on a machine with network first, or unset HF_HUB_OFFLINE"
    )


@pytest.mark.cluster
def test_launch_a_repo_at_a_commit_offline_answers_as_the_folder(tmp_path, tiny_r1):
    cache = tmp_path / "cache"
    snapshot = write_hf_cache(cache, model_files(tiny_r1))
    args = ["--local", "2", "--parallel", "pipeline", "--prompt", "hi", "--max-tokens", "8"]
    from_repo = run_cli("launch", f"{REPO}@{COMMIT}", *args, env=offline_env(cache))
    assert from_repo.returncode == 0, from_repo.stderr
    assert f"loading {COMMIT}" in from_repo.stderr  # the ranks ran on the cache's snapshot
    from_folder = run_cli("launch", str(tiny_r1), *args)
    assert from_folder.returncode == 0, from_folder.stderr
    # The answer follows the loading line, which names the folder the ranks read.
    answer = from_repo.stderr.split("...\n", 1)[1]
    assert answer.strip() and answer == from_folder.stderr.split("...\n", 1)[1]
    assert from_repo.stdout == from_folder.stdout
    assert rank_pids(str(snapshot)) == []


def quantised_llama(folder, sharded: bool = True):
    """A small already quantised llama folder, as mlx-community repos are laid out: two shards
    with an index, or one model.safetensors; the tensors' sizes differ per layer so that a plan
    can tell them apart."""
    import mlx.core as mx

    config = {
        "model_type": "llama",
        "num_hidden_layers": 4,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "quantization": {"group_size": 64, "bits": 4},
    }
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    shards = [
        {
            "model.embed_tokens.weight": mx.zeros((256, 8), mx.uint32),
            "model.layers.0.mlp.down_proj.weight": mx.zeros((64, 16), mx.uint32),
            "model.layers.1.mlp.down_proj.weight": mx.zeros((64, 48), mx.uint32),
        },
        {
            "model.layers.2.mlp.down_proj.weight": mx.zeros((64, 8), mx.uint32),
            "model.layers.3.mlp.down_proj.weight": mx.zeros((64, 96), mx.uint32),
            "model.norm.weight": mx.zeros((64,), mx.float16),
        },
    ]
    if not sharded:
        mx.save_safetensors(str(folder / "model.safetensors"), shards[0] | shards[1])
        return folder
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / name), tensors)
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("sharded", [True, False], ids=["shards-and-index", "one-file"])
def test_plan_of_a_quantised_repo_reads_only_the_headers(tmp_path, sharded):
    local = quantised_llama(tmp_path / "llama-4bit", sharded)
    shards = {p.name for p in local.glob("*.safetensors")}
    index = {"model.safetensors.index.json"} if sharded else set()
    cache = tmp_path / "cache"
    with running_hub({"org/llama-4bit": model_files(local)}) as hub:
        env = QUIET | {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": hub.url}
        result = run_cli("plan", "org/llama-4bit", "--simulate", "2x192GB", "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert "estimated" not in result.stderr
        assert hub.fetched("org/llama-4bit") == {"config.json"} | index
        assert {name for _, name, _ in hub.ranges} == shards  # each shard's header, once
        assert len(hub.ranges) == len(shards)
    assert cached_files(cache, "org/llama-4bit") == {"config.json"} | index
    planned = json.loads(result.stdout)
    folder = plan_json(str(local))
    assert planned == folder | {"model": "org/llama-4bit"}

    # Offline the headers cannot be read: the plan says its sizes are estimated.
    result = run_cli(
        "plan", "org/llama-4bit", "--simulate", "2x192GB", "--json", env=offline_env(cache)
    )
    assert result.returncode == 0, result.stderr
    whole = ""
    if sharded:
        meta = json.loads((local / "model.safetensors.index.json").read_text())["metadata"]
        whole = f"; its index gives {meta['total_size'] / 1e9:.1f} GB in all"
    assert result.stderr.splitlines() == [
        "note: org/llama-4bit planned from config.json: its weights' sizes per layer are "
        f"estimated{whole}"
    ]
    estimated = json.loads(result.stdout)
    assert [n["weights_bytes"] for n in estimated["nodes"]] != [
        n["weights_bytes"] for n in planned["nodes"]
    ]  # so the online plan's sizes came from the headers

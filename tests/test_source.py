"""quantize.source against real huggingface_hub code, offline.

The Hub is replaced in two ways, both without network (tests/hub.py): a Hugging Face cache
written on disk in the layout huggingface_hub itself writes, and a small loopback HTTP server
that answers the Hub endpoints snapshot_download calls. A test checks that the two give
identical caches.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hub import (
    COMMIT,
    REPO,
    cache_layout,
    cached_files,
    model_files,
    running_hub,
    write_hf_cache,
)
from huggingface_hub import constants

from quantize.checkpoint import safetensors_header
from quantize.source import (
    DEFAULT_PATTERNS,
    INDEX_PATTERNS,
    ModelRef,
    SourceError,
    config_only,
    parse_repo_spec,
    pinned,
    repo_of_snapshot,
    resolve_ref,
    resolve_source,
)

ROOT = Path(__file__).resolve().parent.parent
# Files a real repo carries that a conversion does not need.
EXTRAS = {"README.md": b"# tiny-r1\n", ".gitattributes": b"*.safetensors filter=lfs\n"}
EXTRAS["pytorch_model.bin"] = b"\0" * 1000
OFFLINE_HINT = (
    "org/tiny-r1 is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
    "download it on a machine with network first, or unset HF_HUB_OFFLINE"
)


@pytest.fixture(scope="module")
def repo_files(tiny_r1) -> dict[str, bytes]:
    return model_files(tiny_r1) | EXTRAS


@pytest.fixture
def hub(repo_files):
    with running_hub({REPO: repo_files}) as hub:
        yield hub


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """An empty cache for this test with HF_HUB_OFFLINE=1, in this process; returns the cache."""
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub copies the environment into constants when it is imported.
    monkeypatch.setattr(constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


_SCRIPT = """
import json, sys
from quantize import source
from quantize.source import SourceError
try:
    got = getattr(source, sys.argv[1])(sys.argv[2], **json.loads(sys.argv[3]))
    print(json.dumps(got) if isinstance(got, dict) else got)
except SourceError as err:
    print(f"SourceError: {err}")
    sys.exit(3)
"""


def run_source(fn: str, spec: str, env: dict[str, str], **kwargs) -> tuple[int, str]:
    """fn(spec, **kwargs) in a fresh process whose Hugging Face settings come only from env."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    clean |= {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"} | env
    cmd = [sys.executable, "-c", _SCRIPT, fn, spec, json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean, cwd=ROOT, timeout=120)
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode, proc.stdout.strip()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def assert_usable_model(folder: Path, tiny_r1: Path) -> None:
    assert json.loads((folder / "config.json").read_text()) == json.loads(
        (tiny_r1 / "config.json").read_text()
    )
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        header = safetensors_header(folder / shard)
        assert set(index["weight_map"]) >= set(header) - {"__metadata__"}


# --- a repo id -------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["HF_HUB_CACHE", "HF_HOME"])
def test_repo_id_resolves_from_the_cache_in_a_fresh_offline_process(
    tmp_path, tiny_r1, repo_files, hub, setting
):
    cache = tmp_path / "home" / "hub"
    snapshot = write_hf_cache(cache, repo_files)
    where = str(cache) if setting == "HF_HUB_CACHE" else str(cache.parent)
    env = {setting: where, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.url}
    code, out = run_source("resolve_source", REPO, env)
    assert code == 0, out
    assert Path(out) == snapshot
    assert_usable_model(Path(out), tiny_r1)
    assert hub.requests == []  # offline means not a single request


def test_repo_id_downloads_only_the_needed_files_into_the_users_cache(
    tmp_path, tiny_r1, repo_files, hub
):
    cache = tmp_path / "cache"
    code, out = run_source(
        "resolve_source", REPO, {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": hub.url}
    )
    assert code == 0, out
    assert Path(out) == cache / "models--org--tiny-r1" / "snapshots" / COMMIT
    assert_usable_model(Path(out), tiny_r1)
    assert hub.fetched() == set(repo_files) - set(EXTRAS)

    # Run again with the Hub gone: served from the cache it just filled.
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    assert run_source("resolve_source", REPO, env) == (0, out)


def test_the_hand_written_cache_is_the_one_huggingface_hub_writes(tmp_path, repo_files, hub):
    downloaded = tmp_path / "downloaded"
    code, out = run_source(
        "resolve_source", REPO, {"HF_HUB_CACHE": str(downloaded), "HF_ENDPOINT": hub.url}
    )
    assert code == 0, out
    needed = set(repo_files) - set(EXTRAS)
    written = tmp_path / "written"
    write_hf_cache(written, repo_files, cached=needed, tree=True)
    assert cache_layout(written) == cache_layout(downloaded)


def test_allow_patterns_fetch_only_matching_files(tmp_path, repo_files, hub):
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": hub.url}
    patterns = ["config.json", "model-00002-of-*.safetensors"]
    code, out = run_source("resolve_source", REPO, env, allow_patterns=patterns)
    assert code == 0, out
    assert hub.fetched() == {"config.json", "model-00002-of-000002.safetensors"}
    assert sorted(p.name for p in Path(out).iterdir()) == sorted(hub.fetched())


def test_default_patterns_pick_a_conversions_files_from_a_real_repo_listing():
    from huggingface_hub.utils import filter_repo_objects

    listing = [".gitattributes", "LICENSE", "README.md", "figures/benchmark.jpg"]
    listing += ["configuration_deepseek.py", "modeling_deepseek.py", "inference/model.py"]
    listing += ["config.json", "generation_config.json", "model.safetensors.index.json"]
    listing += ["tokenizer.json", "tokenizer_config.json", "pytorch_model.bin", "model.gguf"]
    shards = [f"model-{i:05d}-of-000163.safetensors" for i in range(1, 164)]
    picked = set(filter_repo_objects(listing + shards, allow_patterns=DEFAULT_PATTERNS))
    assert picked == set(shards) | {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_offline_repo_not_in_the_cache_says_how_to_get_it(offline):
    with pytest.raises(SourceError) as err:
        resolve_source(REPO)
    assert str(err.value) == OFFLINE_HINT


def test_offline_repo_not_in_the_cache_in_a_fresh_process(tmp_path, hub):
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.url}
    assert run_source("resolve_source", REPO, env) == (3, f"SourceError: {OFFLINE_HINT}")
    assert hub.requests == []


def test_offline_resolves_in_process_and_by_commit_hash(offline, tiny_r1, repo_files):
    snapshot = write_hf_cache(offline, repo_files)
    assert resolve_source(REPO) == snapshot
    assert resolve_source(REPO, revision=COMMIT) == snapshot
    assert_usable_model(snapshot, tiny_r1)
    with pytest.raises(SourceError, match="org/tiny-r1@v2 is not in the local Hugging Face cache"):
        resolve_source(REPO, revision="v2")


@pytest.mark.parametrize("tree", [True, False], ids=["tree-listing", "no-tree-listing"])
def test_offline_partial_snapshot_is_refused_unless_the_patterns_fit(offline, repo_files, tree):
    # What a dry run leaves behind: config.json only, plus the tokenizer for good measure.
    cached = {"config.json", "tokenizer.json", "tokenizer_config.json"}
    snapshot = write_hf_cache(offline, repo_files, cached=cached, tree=tree)
    with pytest.raises(SourceError, match="org/tiny-r1 is only partly in the local Hugging Face"):
        resolve_source(REPO)
    assert resolve_source(REPO, allow_patterns=["config.json", "tokenizer*"]) == snapshot
    assert config_only(REPO) == snapshot / "config.json"


def test_unreachable_hub_is_a_network_error(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": closed_port_url()}
    code, out = run_source("resolve_source", REPO, env)
    assert code == 3
    assert out.startswith("SourceError: could not reach the Hugging Face Hub: ConnectError")


def test_unknown_and_gated_repos(tmp_path, repo_files, hub):
    hub.repos["org/gated"] = repo_files
    hub.gated.add("org/gated")
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": hub.url}
    code, out = run_source("resolve_source", "org/missing", env)
    assert (code, out) == (
        3,
        "SourceError: org/missing is neither a local path nor a Hugging Face repo you can "
        "access: check the spelling, or log in with `hf auth login` if it is private",
    )
    code, out = run_source("resolve_source", "org/gated", env)
    assert code == 3
    assert out.startswith("SourceError: org/gated is a gated Hugging Face repo")
    assert "https://huggingface.co/org/gated" in out


def test_repo_without_weights_is_refused(tmp_path, repo_files, hub):
    hub.repos["org/code-only"] = {"README.md": b"hi\n", "config.json": repo_files["config.json"]}
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": hub.url}
    code, out = run_source("resolve_source", "org/code-only", env)
    assert (code, out) == (
        3,
        "SourceError: Hugging Face repo org/code-only has no *.safetensors: "
        "give a repo with config.json and safetensors weights",
    )


# --- local paths and nonsense ----------------------------------------------------------------


def test_local_folder_and_gguf_pass_through(offline, tiny_r1, tmp_path):
    assert resolve_source(str(tiny_r1)) == tiny_r1
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)) == gguf


@pytest.mark.parametrize(
    "name, message",
    [
        ("empty-folder", "has no config.json: is it a model folder?"),
        ("weights.bin", "is a file, not a model folder or a .gguf file"),
        ("missing.gguf", "GGUF file .*missing.gguf does not exist"),
    ],
)
def test_bad_local_paths(offline, tmp_path, name, message):
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(SourceError, match=message):
        resolve_source(str(tmp_path / name))


@pytest.mark.parametrize("spec", ["not a path", "tiny-r1", "a/b/c", "./models/x", "org/"])
def test_nonsense_spec(offline, spec):
    with pytest.raises(SourceError) as err:
        resolve_source(spec)
    assert str(err.value) == (
        f"SRC {spec} does not exist: give a model folder, a .gguf file or a Hugging Face repo id"
    )


# --- config_only -----------------------------------------------------------------------------


def test_config_only_local(offline, tiny_r1, tmp_path):
    assert config_only(str(tiny_r1)) == tiny_r1 / "config.json"
    assert config_only(str(tiny_r1 / "config.json")) == tiny_r1 / "config.json"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert config_only(str(gguf)) == gguf
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="has no config.json"):
        config_only(str(tmp_path / "empty"))


def test_config_only_downloads_one_file(tmp_path, tiny_r1, hub):
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": hub.url}
    code, out = run_source("config_only", REPO, env)
    assert code == 0, out
    assert Path(out) == tmp_path / "models--org--tiny-r1" / "snapshots" / COMMIT / "config.json"
    assert Path(out).read_bytes() == (tiny_r1 / "config.json").read_bytes()
    assert hub.fetched() == {"config.json"}


def test_config_only_offline(offline, repo_files):
    with pytest.raises(SourceError, match="not in the local Hugging Face cache"):
        config_only(REPO)
    snapshot = write_hf_cache(offline, repo_files, cached={"config.json"})
    assert config_only(REPO) == snapshot / "config.json"


# --- org/name@revision -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("org/tiny-r1", ("org/tiny-r1", None)),
        ("org/tiny-r1@main", ("org/tiny-r1", "main")),
        ("org/tiny-r1@v1.0", ("org/tiny-r1", "v1.0")),
        (f"org/tiny-r1@{COMMIT}", ("org/tiny-r1", COMMIT)),
        ("org/tiny-r1@refs/pr/1", ("org/tiny-r1", "refs/pr/1")),
        (
            "mlx-community/DeepSeek-R1-0528-4bit@main",
            ("mlx-community/DeepSeek-R1-0528-4bit", "main"),
        ),
        ("tiny-r1", None),  # a bare name: a path mistyped, not gpt2-style ids
        ("./models/x", None),
        ("/abs/models/x", None),
        ("a/b/c", None),
        ("org/", None),
    ],
)
def test_parse_repo_spec(spec, parsed):
    assert parse_repo_spec(spec) == parsed


@pytest.mark.parametrize(
    "spec, why",
    [
        ("org/tiny-r1@", "the revision after @ is empty or holds spaces"),
        ("org/tiny-r1@my branch", "the revision after @ is empty or holds spaces"),
        ("org/ti ny@main", "org and name take letters, digits, '-', '_' and '.'"),
        ("org/-tiny@main", "org and name take letters, digits, '-', '_' and '.'"),
        ("tiny-r1@main", "a repo id is org/name"),
        ("a/b/c@main", "a repo id is org/name"),
    ],
)
def test_bad_repo_spec_is_one_line(spec, why):
    with pytest.raises(SourceError) as err:
        parse_repo_spec(spec)
    assert str(err.value) == (
        f"{spec} is not a Hugging Face repo id ({why}): give org/name or org/name@revision "
        "(a branch, tag or commit)"
    )


@pytest.mark.parametrize("revision", ["main", "v1.0", COMMIT])
def test_offline_revision_resolves_from_the_cache_refs(offline, repo_files, revision):
    snapshot = write_hf_cache(offline, repo_files, refs=("main", "v1.0"))
    ref = resolve_ref(f"{REPO}@{revision}")
    assert ref == ModelRef(REPO, revision, snapshot)
    assert resolve_source(REPO, revision=revision) == snapshot


def test_offline_unknown_revision_is_one_line(offline, repo_files):
    write_hf_cache(offline, repo_files)
    with pytest.raises(SourceError) as err:
        resolve_ref(f"{REPO}@v2")
    assert str(err.value) == OFFLINE_HINT.replace(REPO, f"{REPO}@v2", 1)


def test_a_revision_given_twice_must_agree(offline, repo_files):
    snapshot = write_hf_cache(offline, repo_files, refs=("main", "v1.0"))
    assert resolve_source(f"{REPO}@v1.0", revision="v1.0") == snapshot
    with pytest.raises(SourceError, match="names its revision already: not also main"):
        resolve_source(f"{REPO}@v1.0", revision="main")


@pytest.mark.parametrize("revision", ["v1.0", "refs/pr/1", COMMIT])
def test_revision_downloads_that_commit(tmp_path, repo_files, hub, revision):
    hub.revisions |= {"v1.0", "refs/pr/1"}
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": hub.url}
    code, out = run_source("config_only", f"{REPO}@{revision}", env)
    assert code == 0, out
    assert Path(out) == tmp_path / "models--org--tiny-r1" / "snapshots" / COMMIT / "config.json"
    assert hub.fetched() == {"config.json"}


def test_unknown_revision_on_the_hub_is_one_line(tmp_path, hub):
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": hub.url}
    assert run_source("resolve_source", f"{REPO}@v9", env) == (
        3,
        "SourceError: org/tiny-r1@v9: the Hugging Face repo has no such revision",
    )


def test_index_only_fetches_config_and_index(tmp_path, repo_files, hub):
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": hub.url}
    code, out = run_source("resolve_source", REPO, env, allow_patterns=INDEX_PATTERNS)
    assert code == 0, out
    assert hub.fetched() == {"config.json", "model.safetensors.index.json"}
    assert cached_files(tmp_path) == hub.fetched()
    assert repo_of_snapshot(Path(out)) == (REPO, COMMIT)


def test_safetensors_headers_by_byte_ranges(tmp_path, tiny_r1, hub):
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": hub.url}
    code, out = run_source("safetensors_headers", REPO, env, revision=COMMIT)
    assert code == 0, out
    headers = json.loads(out)
    shards = sorted(p.name for p in tiny_r1.glob("*.safetensors"))
    assert sorted(headers) == shards
    for shard in shards:
        on_disk = safetensors_header(tiny_r1 / shard)
        on_disk.pop("__metadata__", None)
        assert headers[shard] == on_disk
    assert hub.fetched() == {"model.safetensors.index.json"}  # never a shard in whole
    assert {name for _, name, _ in hub.ranges} == set(shards)


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "it is not JSON"),
        ('{"metadata": {}}', "it has no weight_map"),
        ('{"weight_map": [1, 2]}', "its weight_map is not a map of tensor names to files"),
    ],
)
def test_a_malformed_index_is_one_line_naming_the_file(offline, repo_files, text, why):
    files = repo_files | {"model.safetensors.index.json": text.encode()}
    snapshot = write_hf_cache(offline, files)
    with pytest.raises(SourceError) as err:
        resolve_ref(REPO)
    index = snapshot / "model.safetensors.index.json"
    assert str(err.value) == (
        f"{index} is not a safetensors index ({why}): delete it and fetch {REPO} again; if the "
        "repo itself holds it so, give another revision or tell the repo's owners"
    )


def test_a_ref_is_pinned_at_the_commit_of_the_snapshot_it_read(offline, repo_files, tmp_path):
    """What every node is sent: the commit the plan's snapshot is, not the branch's name."""
    snapshot = write_hf_cache(offline, repo_files, refs=("main", "refs/pr/1"))
    for revision in ("main", "refs/pr/1"):
        ref = resolve_ref(f"{REPO}@{revision}")
        assert pinned(ref) == ModelRef(REPO, COMMIT, snapshot)
    local = ModelRef(None, None, tmp_path)
    assert pinned(local) is local

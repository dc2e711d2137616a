"""`mlxdist quantize`: equal to mlx_lm.convert, per-node folders, bounded memory, clear errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import ROOT, complete_ids, local_cluster, run_cli
from mlx_lm import load
from mlx_lm.generate import generate_step

from quantize.checkpoint import CheckpointError, layer_of, safetensors_header, sha256_file


def tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def greedy(folder: Path, prompt: list[int], n: int = 12) -> list[int]:
    model, _ = load(str(folder))
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def assert_error(result, *fragments: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def converted(tiny_r1_no_mtp, tmp_path_factory):
    """mlx_lm.convert's 4-bit model and ours, from the same tiny-r1."""
    from mlx_lm import convert

    base = tmp_path_factory.mktemp("quantized")
    convert(str(tiny_r1_no_mtp), str(base / "mlx_lm"), quantize=True, q_bits=4, q_group_size=64)
    result = run_cli("quantize", str(tiny_r1_no_mtp), str(base / "ours"), "--bits", "4")
    assert result.returncode == 0, result.stderr
    return base / "mlx_lm", base / "ours"


def test_tensors_equal_mlx_lm_convert(converted):
    theirs, ours = (tensors(p) for p in converted)
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        got = ours[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert mx.array_equal(got, expected).item(), name
    print(f"{len(ours)} tensors equal, bit for bit")


def test_greedy_output_equals_mlx_lm_convert(converted):
    theirs, ours = converted
    prompt = [0, 5, 17, 300, 42]
    expected = greedy(theirs, prompt)
    assert len(set(expected)) > 1
    assert greedy(ours, prompt) == expected


def test_mtp_layer_is_dropped_by_index(tiny_r1, converted, tmp_path):
    result = run_cli("quantize", str(tiny_r1), str(tmp_path / "out"), "--bits", "4")
    assert result.returncode == 0, result.stderr
    ours = tensors(tmp_path / "out")
    assert not any(layer_of(k) == 4 for k in ours)  # the MTP layer sat at index 4
    assert not any(k.startswith("mtp.") for k in ours)  # kept only with --keep-mtp
    reference = tensors(converted[1])
    assert sorted(ours) == sorted(reference)
    assert all(mx.array_equal(ours[k], reference[k]).item() for k in ours)


@pytest.fixture(scope="module")
def cut(tiny_r1, tmp_path_factory):
    out = tmp_path_factory.mktemp("cut") / "r1-4bit"
    result = run_cli(
        "quantize", str(tiny_r1), str(out), "--split", "2,1,1", "--max-file-size", "0.0005"
    )
    assert result.returncode == 0, result.stderr
    return out


def test_no_node_folder_holds_the_mtp_layer_without_keep_mtp(cut):
    for folder in [cut, *(cut / "nodes").iterdir()]:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert not any(k.startswith("mtp.") for k in index["weight_map"]), folder
        assert "mtp" not in json.loads((folder / "manifest.json").read_text()), folder


def test_node_folders_hold_only_their_range(cut):
    manifest = json.loads((cut / "manifest.json").read_text())
    assert [n["layers"] for n in manifest["nodes"]] == [[0, 2], [2, 3], [3, 4]]
    for rank, (start, end) in enumerate([(0, 2), (2, 3), (3, 4)]):
        folder = cut / "nodes" / str(rank)
        node = json.loads((folder / "manifest.json").read_text())
        assert node["plan"]["split"] == [2, 1, 1] and node["plan"]["rank"] == rank
        names = []
        for entry in node["files"]:
            f = folder / entry["name"]
            assert f.stat().st_size == entry["size"] and sha256_file(f) == entry["sha256"]
            names += list(safetensors_header(f))
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(names)
        layers = {layer_of(n) for n in names} - {None}
        assert layers == set(range(start, end)), (rank, layers)
        assert any("embed_tokens" in n for n in names) == (rank == 0)
        assert any(n.startswith("lm_head") for n in names) == (rank == 2)
        assert any(n == "model.norm.weight" for n in names) == (rank == 2)
    print("each node folder holds exactly its layers")


@pytest.mark.cluster
def test_cluster_from_node_folders_equals_whole_folder(cut, tmp_path):
    prompt = [0, 5, 17, 300, 42]
    expected = greedy(cut, prompt, 12)
    eos = 1  # tiny-r1's end of sentence: the cluster stops there, generate_step does not
    expected = expected[: expected.index(eos)] if eos in expected else expected
    with local_cluster(cut, [2, 1, 1], run_dir=tmp_path) as (url, _):
        got = complete_ids(url, prompt, 12)
    for rank in range(3):
        log = (tmp_path / f"rank-{rank}.log").read_text()
        assert f"from {cut / 'nodes' / str(rank)} " in log, log
    assert got == expected


def test_node_folder_cut_for_another_plan_is_refused(cut):
    from mlxdist.runtime.stage import load_stage

    with pytest.raises(CheckpointError, match=r"cut for rank 1 of split \[2, 1, 1\]"):
        load_stage(cut / "nodes" / "1", [2, 2], 1)
    result = run_cli("launch", str(cut / "nodes" / "0"), "--local", "2", "--prompt", "hi")
    assert_error(result, "one node's folder", str(cut))


def copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def retype_tensor(file: Path, name: str, dtype: str) -> None:
    """Rewrites one tensor's dtype in a safetensors header, keeping the data as it is."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header[name]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def no_complete_output(out: Path) -> bool:
    return (
        not (out / "config.json").exists() and not (out / "model.safetensors.index.json").exists()
    )


@pytest.mark.parametrize("fault", ["missing-file", "inconsistent-index", "bad-index-json"])
def test_broken_index(tiny_r1, tmp_path, fault):
    src = copy_model(tiny_r1, tmp_path / "src")
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    if fault == "missing-file":
        (src / files[-1]).unlink()
        expected = f"the index names {files[-1]}, which is missing"
    elif fault == "inconsistent-index":
        index["weight_map"]["model.norm.weight"] = files[0]
        index_path.write_text(json.dumps(index))
        expected = f"the index puts model.norm.weight in {files[0]}"
    else:
        index_path.write_text("{not json")
        expected = "is not a valid safetensors index"
    out = tmp_path / "out"
    assert_error(run_cli("quantize", str(src), str(out)), expected)
    assert no_complete_output(out)


def test_truncated_safetensors(tiny_r1, tmp_path):
    src = copy_model(tiny_r1, tmp_path / "src")
    victim = sorted(src.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size - 1000])
    out = tmp_path / "out"
    assert_error(run_cli("quantize", str(src), str(out)), f"{victim.name} is truncated")
    assert no_complete_output(out)


def test_unsupported_dtype(tiny_r1, tmp_path):
    src = copy_model(tiny_r1, tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.0.input_layernorm.weight"
    retype_tensor(src / index["weight_map"][name], name, "F8_E5M2")
    out = tmp_path / "out"
    assert_error(run_cli("quantize", str(src), str(out)), name, "F8_E5M2", "does not read")
    assert no_complete_output(out)


def test_unsupported_model_type(tiny_r1, tmp_path):
    src = copy_model(tiny_r1, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(config))
    assert_error(run_cli("quantize", str(src), str(tmp_path / "out")), "'gpt2'", "not supported")


def test_out_not_empty_needs_force(tiny_r1, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_error(run_cli("quantize", str(tiny_r1), str(out)), "is not empty", "--force")
    assert (out / "precious.txt").read_text() == "keep me"
    result = run_cli("quantize", str(tiny_r1), str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert not (out / "precious.txt").exists() and (out / "config.json").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB file system (tmpfs), as root can mount here."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.fail("mounting a tmpfs needs root, which this project's machines and CI have")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.skipif(sys.platform != "linux", reason="mount -t tmpfs is Linux only")
def test_too_little_disk_is_found_before_writing(tiny_r1, small_disk):
    out = small_disk / "out"
    result = run_cli("quantize", str(tiny_r1), str(out), "--bits", "8")
    assert_error(result, "the output needs", "free")
    assert not list(out.glob("*.safetensors*"))


@pytest.mark.heavy
def test_interrupt_then_resume(r1_1gb, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mlxdist.cli", "quantize", str(r1_1gb), str(out)]
    args += ["--max-file-size", "0.04"]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    progress = out / ".mlxdist-progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (
            progress.is_file()
            and len(json.loads(progress.read_text() or "{}").get("done", {})) >= 2
        ):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert no_complete_output(out)  # nothing there looks like a finished model
    done = json.loads(progress.read_text())["done"]
    print(f"interrupted with {len(done)} files done")

    result = run_cli(*args[3:], timeout=300)
    assert result.returncode == 0, result.stderr
    kept = re.search(r"(\d+) kept from an earlier run", result.stderr)
    assert kept and int(kept.group(1)) >= len(done) - 1, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert sha256_file(out / entry["name"]) == entry["sha256"]
    assert not list(out.glob("*.partial")) and not progress.exists()
    fresh = tmp_path / "fresh"
    assert run_cli(*args[3:5], str(fresh), *args[6:], timeout=300).returncode == 0
    again = json.loads((fresh / "manifest.json").read_text())
    assert [e["sha256"] for e in again["files"]] == [e["sha256"] for e in manifest["files"]]


@pytest.mark.heavy
def test_peak_memory_stays_under_three_layers(r1_1gb, tmp_path):
    result = run_cli("quantize", str(r1_1gb), str(tmp_path / "out"), timeout=300)
    assert result.returncode == 0, result.stderr
    m = re.search(r"(\d+) MiB above the start, largest source layer (\d+) MiB", result.stderr)
    above, layer = int(m.group(1)), int(m.group(2))
    print(f"\npeak above start {above} MiB, largest layer {layer} MiB: {above / layer:.2f}x")
    assert above < 3 * layer


def test_dry_run_on_deepseek_r1_config():
    config = ROOT / "tests" / "data" / "deepseek-r1-config.json"
    result = run_cli("quantize", str(config), "--dry-run", "--recipe", "r1-4bit", "--nodes", "6")
    assert result.returncode == 0, result.stderr
    print(result.stderr)
    assert "671.0B parameters" in result.stderr
    assert "each node's share (r1-4bit)" in result.stderr  # the recipe chosen, not another row
    rows = dict(re.findall(r"│ (r1-[34]bit)\S*[^│]*│\s+([\d.]+) │", result.stderr))
    assert float(rows["r1-4bit"]) == pytest.approx(381.9, abs=0.1)
    assert float(rows["r1-3bit"]) == pytest.approx(327.4, abs=0.1)
    shares = [float(x) for x in re.findall(r"│\s+\d+ │\s+\d+-\d+ │\s+([\d.]+) │", result.stderr)]
    assert len(shares) == 6 and sum(shares) == pytest.approx(381.9, abs=0.1)
    assert max(shares) < 192  # each fits a 192 GB Mac Studio


def test_quantize_a_hub_repo_from_the_offline_cache(tiny_r1, tmp_path):
    from test_source import REPO, write_hf_cache

    cache = tmp_path / "hf" / "hub"
    files = {p.name: p.read_bytes() for p in sorted(tiny_r1.iterdir()) if p.is_file()}
    write_hf_cache(cache, files)
    env = {"HF_HOME": str(cache.parent), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    result = run_cli("quantize", REPO, str(out), "--nodes", "2", env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(tensors(out)) == sorted(
        tensors(out / "nodes" / "0") | tensors(out / "nodes" / "1")
    )
    missing = run_cli("quantize", "org/not-cached", str(tmp_path / "x"), env=env)
    assert_error(missing, "HF_HUB_OFFLINE")


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8"])
def test_other_quantisation_modes_load_and_run(tiny_r1, tmp_path, mode):
    out = tmp_path / mode
    result = run_cli("quantize", str(tiny_r1), str(out), "--mode", mode)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["mode"] == mode
    tokens = greedy(out, [0, 5, 17, 300, 42], 6)
    assert len(tokens) == 6


def test_recipe_and_overrides_are_recorded(tiny_r1, tmp_path):
    out = tmp_path / "mixed"
    result = run_cli(
        "quantize",
        str(tiny_r1),
        str(out),
        "--recipe",
        "r1-3bit",
        "--override",
        "*.o_proj=8",
        "--override",
        "model.embed_tokens=none",
    )
    assert result.returncode == 0, result.stderr
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["model.layers.1.mlp.switch_mlp.gate_proj"]["bits"] == 3
    # Modules at the default settings are not listed; the loader reads them from the shapes.
    assert q["bits"] == 4 and "model.layers.1.mlp.switch_mlp.down_proj" not in q
    assert q["model.layers.1.self_attn.q_b_proj"]["bits"] == 6
    assert q["model.layers.1.self_attn.o_proj"]["bits"] == 8
    weights = tensors(out)
    assert "model.embed_tokens.scales" not in weights
    assert weights["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    assert weights["model.norm.weight"].dtype == mx.bfloat16
    assert len(greedy(out, [0, 5, 17, 300, 42], 6)) == 6


def test_flipped_byte_is_named_before_launch(cut, tmp_path):
    from conftest import rank_pids

    model = copy_model(cut, tmp_path / "damaged")
    victim = sorted(model.glob("model-*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside a tensor's data
    victim.write_bytes(bytes(data))
    result = run_cli("launch", str(model), "--local", "3", "--split", "2,1,1", "--prompt", "hi")
    assert_error(result, str(victim), "sha256")
    assert "loading" not in result.stderr  # found before any rank started
    assert rank_pids(str(model)) == []

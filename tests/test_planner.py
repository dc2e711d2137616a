"""The planner: which node holds which layers, and whether the model fits. Pure, no processes."""

import itertools
import json
import re
from dataclasses import asdict

import pytest
from conftest import ROOT, run_cli

from launcher.planner import (
    GIB,
    ActivationSpec,
    ModelSpec,
    NodeSpec,
    Plan,
    activation_bytes_at,
    activation_spec,
    best_expert_counts,
    best_split,
    fixed_bytes,
    kv_bytes_per_token_per_layer,
    model_spec_from_config,
    model_spec_from_folder,
    parse_simulate,
    plan,
    plan_experts,
    plan_to_json,
    simulated_nodes,
    tensor_prompt_cache_bytes,
)
from mlxdist.cli.plan import nodes_from_hosts, plan_command
from quantize.checkpoint import read_config
from quantize.nodes import even_split, read_expert_plan_file, read_plan_file

R1_CONFIG = ROOT / "tests" / "data" / "deepseek-r1-config.json"
GB = 10**9


def uniform(layers: int, layer_gb: float, edge_gb: float = 0.1, tied=False, kv=0) -> ModelSpec:
    """A model whose layers all weigh the same, with small embeddings and head."""
    return ModelSpec(
        "uniform", [int(layer_gb * GB)] * layers, int(edge_gb * GB), int(edge_gb * GB), tied, kv
    )


def nodes(*gib: float) -> list[NodeSpec]:
    return [NodeSpec(f"n{i}", int(g * GIB)) for i, g in enumerate(gib)]


@pytest.fixture(scope="module")
def r1_4bit() -> ModelSpec:
    return model_spec_from_config(read_config(R1_CONFIG), bits=4)


# --- even and uneven memory ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "memory,layers,expected",
    [
        ((64, 64), 60, [30, 30]),
        ((64, 64, 64, 64), 60, [15, 15, 15, 15]),
        ((64, 64, 64), 61, [20, 21, 20]),  # the end ranks also hold embeddings and head
        ((192,) * 6, 60, [10] * 6),
        ((64,), 60, [60]),
    ],
)
def test_even_memory_gives_an_even_split(memory, layers, expected):
    p = plan(nodes(*memory), uniform(layers, 0.5))
    assert p.split == expected
    assert p.fits and p.message == "fits" and p.shortfalls == {}


@pytest.mark.parametrize(
    "memory,layers",
    [((512, 192, 192), 60), ((192, 512, 192), 60), ((128, 64, 32), 61), ((96, 192, 384, 768), 80)],
)
def test_uneven_memory_gives_layers_in_proportion(memory, layers):
    p = plan(nodes(*memory), uniform(layers, 1.0))
    usable = [0.9 * m * GIB for m in memory]
    share = [layers * u / sum(usable) for u in usable]
    assert sum(p.split) == layers
    assert all(abs(n - s) <= 1 for n, s in zip(p.split, share)), (p.split, share)
    assert p.fits


def test_512_192_192_split():
    p = plan(nodes(512, 192, 192), uniform(60, 1.0))
    assert p.split == [34, 13, 13]  # 512 : 192 : 192 is 34.3 : 12.9 : 12.9 of 60
    print("512+192+192 GiB, 60 layers:", p.split)


# --- does not fit -------------------------------------------------------------------------------


def test_node_too_small_for_one_layer_is_named():
    cluster = [*nodes(192, 192, 192), NodeSpec("tiny", 4 * GIB)]
    model = uniform(60, 5.0)
    p = plan(cluster, model)
    assert not p.fits
    assert p.split[3] == 1 and list(p.shortfalls) == ["tiny"]
    short = 5 * GB + model.tail_bytes - (4 * GIB - int(0.1 * 4 * GIB))  # one layer, the head
    assert p.shortfalls["tiny"] == short
    assert p.message == (
        f"does not fit: node tiny is short by {short / GB:.1f} GB (too small for even one layer)"
    )


def test_drop_small_leaves_the_small_node_out_when_the_rest_fits():
    cluster = [*nodes(192, 192, 192), NodeSpec("tiny", 4 * GIB)]
    p = plan(cluster, uniform(60, 5.0), drop_small=True)
    assert p.fits and p.dropped == ["tiny"] and p.order == ["n0", "n1", "n2"]
    assert p.split == [20, 20, 20]


def test_drop_small_keeps_the_node_when_the_model_does_not_fit_anyway():
    cluster = [*nodes(64, 64), NodeSpec("tiny", 4 * GIB)]
    p = plan(cluster, uniform(60, 5.0), drop_small=True)
    assert not p.fits and p.dropped == [] and "tiny" in p.order
    assert plan(cluster, uniform(60, 5.0)) == p


def test_long_context_pushes_the_kv_cache_over_a_node():
    # llama-70B-like: 8 KV heads of 128 in bf16, 4 KiB per token per layer
    model = uniform(20, 1.0, kv=4096)
    cluster = [NodeSpec("big", 16 * GIB), NodeSpec("small", 10 * GIB)]
    assert plan(cluster, model, context=4096).fits
    p = plan(cluster, model, context=128 * 1024)
    assert not p.fits and set(p.shortfalls) == {"big", "small"}
    for row, node in zip(p.nodes, cluster):
        kv = row.layers * 4096 * 128 * 1024
        weights = row.layers * GB + fixed_bytes(row.rank, 2, model)
        usable = node.memory_total - int(node.memory_total * 0.1)
        assert (row.kv_bytes, row.weights_bytes, row.usable_bytes) == (kv, weights, usable)
        assert row.free_bytes == usable - weights - kv
    for name, need in p.shortfalls.items():
        assert need == -p.nodes[p.order.index(name)].free_bytes > 0
        assert f"node {name} is short by {need / GB:.1f} GB" in p.message
    print(p.message)


def test_batch_multiplies_the_kv_cache():
    model = uniform(8, 1.0, kv=1000)
    one, four = plan(nodes(64, 64), model, context=1000), plan(nodes(64, 64), model, 1000, batch=4)
    assert [r.kv_bytes * 4 for r in one.nodes] == [r.kv_bytes for r in four.nodes]


def test_more_nodes_than_layers_is_refused():
    with pytest.raises(ValueError, match="cannot split 3 layers over 4 nodes"):
        plan(nodes(64, 64, 64, 64), uniform(3, 1.0))


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"order": ["n1", "nx"]}, "must name each node once"),
        ({"headroom": -1}, "headroom"),
        ({"batch": 0}, "batch"),
    ],
)
def test_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        plan(nodes(64, 64), uniform(8, 1.0), **kw)


# --- headroom, order, tied embeddings -----------------------------------------------------------


@pytest.mark.parametrize(
    "headroom,usable",
    [(0.1, 64 * GIB - int(64 * GIB * 0.1)), (0.25, 48 * GIB), (8 * GB, 64 * GIB - 8 * GB)],
)
def test_headroom_is_a_fraction_or_bytes(headroom, usable):
    p = plan(nodes(64), uniform(4, 1.0), headroom=headroom)
    assert p.nodes[0].usable_bytes == usable


def test_available_memory_is_planned_when_known():
    node = NodeSpec("busy", 64 * GIB, memory_available=40 * GIB)
    row = plan([node], uniform(4, 1.0)).nodes[0]
    assert row.memory_bytes == 40 * GIB and row.usable_bytes == 40 * GIB - int(6.4 * GIB)


def test_order_sets_the_ranks():
    cluster = nodes(512, 192)
    p = plan(cluster, uniform(60, 1.0), order=["n1", "n0"])
    assert p.order == ["n1", "n0"] and p.split[0] < p.split[1]
    assert [r.name for r in p.nodes] == ["n1", "n0"]


@pytest.mark.parametrize("tied", [False, True])
def test_embeddings_on_rank_0_and_on_the_last_rank_when_tied(tied):
    model = ModelSpec("m", [GB] * 9, 2 * GB, GB // 10, tied, 0)
    rows = plan(nodes(64, 64, 64), model).nodes
    layer_sum = [r.layers * GB for r in rows]
    assert rows[0].weights_bytes == layer_sum[0] + 2 * GB
    assert rows[1].weights_bytes == layer_sum[1]
    assert rows[2].weights_bytes == layer_sum[2] + GB // 10 + (2 * GB if tied else 0)


def test_tied_embeddings_on_one_node_are_counted_once():
    model = ModelSpec("m", [GB] * 4, 2 * GB, GB // 10, True, 0)
    assert plan(nodes(64), model).nodes[0].weights_bytes == 4 * GB + 2 * GB + GB // 10


# --- the split is the best there is -------------------------------------------------------------


def _ratios(split, cost, fixed, usable):
    out, start = [], 0
    for r, n in enumerate(split):
        out.append((fixed[r] + sum(cost[start : start + n])) / usable[r])
        start += n
    return tuple(sorted(out, reverse=True))


def _all_splits(layers, ranks):
    for cuts in itertools.combinations(range(1, layers), ranks - 1):
        bounds = (0, *cuts, layers)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize(
    "cost,fixed,usable",
    [
        ([1, 1, 1, 9, 9, 9, 9, 9, 9, 9], [5, 0, 7], [40, 30, 20]),
        ([3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 0, 0, 3], [10, 30, 20, 10]),
        ([5] * 8, [1, 1], [10, 100]),
        ([7, 7, 7, 7], [0, 0, 0, 0], [1, 1, 1, 1]),
        ([1, 2, 3, 4, 5, 6], [0, 0, 0], [5, 5, 5]),  # no split fits: the overload is spread
    ],
)
def test_best_split_is_lexicographically_smallest_of_all_splits(cost, fixed, usable):
    got = best_split(cost, fixed, usable)
    best = min(_ratios(s, cost, fixed, usable) for s in _all_splits(len(cost), len(fixed)))
    assert _ratios(got, cost, fixed, usable) == best
    assert all(n >= 1 for n in got) and sum(got) == len(cost)


def test_plan_is_deterministic(r1_4bit):
    a = plan(parse_simulate("2x512GB,4x192GB"), r1_4bit)
    b = plan(parse_simulate("2x512GB,4x192GB"), r1_4bit)
    assert a == b


# --- R1 at 4 bits on six 192 GB Mac Studios -----------------------------------------------------


def test_kv_bytes_per_token_per_layer():
    r1 = read_config(R1_CONFIG)
    assert kv_bytes_per_token_per_layer(r1) == (512 + 64) * 2  # MLA: kv_latent and k_pe, bf16
    llama = {"model_type": "llama", "num_attention_heads": 64, "num_key_value_heads": 8}
    llama |= {"hidden_size": 8192, "torch_dtype": "bfloat16"}
    assert kv_bytes_per_token_per_layer(llama) == 2 * 8 * 128 * 2
    assert kv_bytes_per_token_per_layer(llama | {"torch_dtype": "float32"}) == 2 * 8 * 128 * 4
    assert kv_bytes_per_token_per_layer(llama | {"head_dim": 64}) == 2 * 8 * 64 * 2
    with pytest.raises(ValueError, match="num_attention_heads"):
        kv_bytes_per_token_per_layer({"model_type": "llama"})


LLAMA_70B = {"model_type": "llama", "num_attention_heads": 64, "num_key_value_heads": 8}
LLAMA_70B |= {"hidden_size": 8192, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize(
    "config,kv_bits,expected",
    [
        # per KV head and token: head_dim x bits / 8 packed bytes, a scale and a bias per 64
        (LLAMA_70B, None, 2 * 8 * 128 * 2),
        (LLAMA_70B, 8, 2 * 8 * (128 + 2 * 2 * 2)),
        (LLAMA_70B, 4, 2 * 8 * (64 + 2 * 2 * 2)),
        (LLAMA_70B | {"torch_dtype": "float32"}, 8, 2 * 8 * (128 + 2 * 2 * 4)),
        (LLAMA_70B | {"head_dim": 64}, 4, 2 * 8 * (32 + 2 * 1 * 2)),
        # MLA, should it ever run quantised: the latent (512) and the rotary key (64)
        (
            {"model_type": "deepseek_v3", "kv_lora_rank": 512, "qk_rope_head_dim": 64},
            8,
            512 + 2 * 8 * 2 + 64 + 2 * 2,
        ),
    ],
)
def test_kv_bytes_at_4_and_8_bits(config, kv_bits, expected):
    assert kv_bytes_per_token_per_layer(config, kv_bits) == expected


def test_8bit_kv_fits_a_longer_context(tmp_path):
    """A context whose bf16 KV cache does not fit two 48 GB Macs fits with an 8-bit one (136 of
    256 bytes per value pair), with more left at 4 bits; `mlxdist plan --kv-bits` says so too."""
    config = LLAMA_70B | {"num_hidden_layers": 80, "intermediate_size": 28672}
    config |= {"rms_norm_eps": 1e-5, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    bf16, q8, q4 = (model_spec_from_folder(tmp_path, kv_bits=b) for b in (None, 8, 4))
    assert q8.layer_bytes == bf16.layer_bytes
    assert q8.kv_bytes_per_token_per_layer / bf16.kv_bytes_per_token_per_layer == 136 / 256
    macs, context = simulated_nodes("2x48GB"), 128 * 1024
    assert not plan(macs, bf16, context=context).fits
    assert plan(macs, q8, context=context).fits
    left = [plan(macs, q, context=context).prompt_cache_bytes for q in (q8, q4)]
    assert 0 < left[0] < left[1]
    args = (str(tmp_path), None, "2x48GB", context, 1, 4, True)
    assert plan_command(*args, parallel="pipeline") == 1
    assert plan_command(*args, parallel="pipeline", kv_bits=8) == 0


def test_prompt_cache_budget_is_half_the_least_left():
    """Half of what the fullest node has left after weights, KV cache and a prefill step's
    activations; 0 when nothing is left; the same rule for a split given (the launch's)."""
    act = ActivationSpec(bytes_per_chunk_token=1000)
    model = ModelSpec("m", [GB] * 8, GB // 10, GB // 10, False, 1000, activation=act)
    p = plan(nodes(16, 8), model, context=4096)
    left = min(row.free_bytes for row in p.nodes) - activation_bytes_at(act, 4096)
    assert p.prompt_cache_bytes == left // 2 > 0
    assert plan_to_json(p)["prompt_cache_bytes"] == p.prompt_cache_bytes
    given = plan(nodes(16, 8), model, context=4096, split=[4, 4])
    assert given.split == [4, 4] and given.prompt_cache_bytes < p.prompt_cache_bytes
    assert plan(nodes(4, 4), model, context=4096).prompt_cache_bytes == 0  # does not fit
    with pytest.raises(ValueError, match="not 8 layers over 2 nodes"):
        plan(nodes(16, 8), model, split=[4, 3])


def test_prompt_cache_budget_in_expert_and_tensor_mode():
    """Expert mode: half the least free (its rows count the activations already), for the
    counts given too; tensor mode: 1/N of the weights and KV cache on each node."""
    act = ActivationSpec(bytes_per_chunk_token=1000)
    model = ModelSpec(
        "moe", [GB] * 4, GB // 10, GB // 10, False, 1000, [GB // 2] * 4, 8, activation=act
    )
    p = plan_experts(nodes(16, 8), model, context=4096)
    assert p.prompt_cache_bytes == min(row.free_bytes for row in p.nodes) // 2 > 0
    given = plan_experts(nodes(16, 8), model, context=4096, counts=[4, 4])
    assert given.experts == [4, 4] and given.prompt_cache_bytes < p.prompt_cache_bytes
    with pytest.raises(ValueError, match="not 8 over 2 nodes"):
        plan_experts(nodes(16, 8), model, counts=[4, 3])
    two = nodes(8, 8)
    held = (model.total_bytes + 1000 * 4 * 4096) // 2
    left = two[0].usable_bytes() - held - activation_bytes_at(act, 4096)
    assert tensor_prompt_cache_bytes(two, model, 4096) == left // 2


def test_r1_4bit_fits_six_192gb_macs(r1_4bit):
    p = plan(parse_simulate("6x192GB"), r1_4bit)
    print("R1 4-bit on 6x192GB:", p.split, p.message)
    for r in p.nodes:
        print(
            f"  rank {r.rank} {r.name}: {r.layers} layers from {r.first_layer}, "
            f"weights {r.weights_bytes / GB:.1f} GB, KV {r.kv_bytes / GB:.2f} GB, "
            f"usable {r.usable_bytes / GB:.1f} GB, free {r.free_bytes / GB:.1f} GB"
        )
    assert p.fits and p.message == "fits"
    assert sum(p.split) == 61 and all(n >= 1 for n in p.split) and len(p.split) == 6
    assert p.split == [12, 10, 10, 10, 10, 9]
    assert sum(r.weights_bytes for r in p.nodes) == (
        sum(r1_4bit.layer_bytes) + r1_4bit.embed_bytes + r1_4bit.tail_bytes
    )
    assert p.nodes[1].kv_bytes == 10 * 1152 * 4096


def test_r1_4bit_does_not_fit_two_192gb_macs(r1_4bit):
    p = plan(parse_simulate("2x192GB"), r1_4bit)
    assert not p.fits and set(p.shortfalls) == {"node0", "node1"}
    assert p.message.startswith("does not fit: node node0 is short by ")


def test_quantised_folder_is_sized_from_its_safetensors_headers(tmp_path):
    import mlx.core as mx

    config = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "quantization": {"group_size": 64, "bits": 4},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = {
        "model.embed_tokens.weight": mx.zeros((10, 8), mx.uint32),
        "model.layers.0.mlp.weight": mx.zeros((100,), mx.float16),
        "model.layers.1.mlp.weight": mx.zeros((300,), mx.float16),
        "model.layers.2.mlp.weight": mx.zeros((999,), mx.float16),  # an MTP layer: not loaded
        "model.norm.weight": mx.zeros((64,), mx.float16),
    }
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    spec = model_spec_from_folder(tmp_path)
    assert spec.layer_bytes == [200, 600]
    assert (spec.embed_bytes, spec.tail_bytes, spec.tied) == (320, 128, True)
    assert spec.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 2
    assert spec.name == tmp_path.name


# --- parse_simulate and hosts.toml --------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("6x192GB", [(f"node{i}", 192 * GIB) for i in range(6)]),
        ("2x512GB,4x192GB", [(f"node{i}", (512 if i < 2 else 192) * GIB) for i in range(6)]),
        ("m3ultra-512,m2ultra-192", [("m3ultra", 512 * GIB), ("m2ultra", 192 * GIB)]),
        ("2xstudio-192", [("studio0", 192 * GIB), ("studio1", 192 * GIB)]),
        ("mac-mini-64GB, 1x1.5TB", [("mac-mini", 64 * GIB), ("node1", int(1.5 * 2**40))]),
        ("192", [("node0", 192 * GIB)]),
        ("3 x 96GiB", [(f"node{i}", 96 * GIB) for i in range(3)]),
    ],
)
def test_parse_simulate(spec, expected):
    assert [(n.name, n.memory_total) for n in parse_simulate(spec)] == expected
    assert all(n.memory_available is None for n in parse_simulate(spec))


@pytest.mark.parametrize(
    "spec,message",
    [
        ("", "is not COUNTxSIZE"),
        ("6x", "not a memory size"),
        ("6x192GB x", "is not COUNTxSIZE"),
        ("x192GB", "is not COUNTxSIZE"),
        ("6x192XB", "not a memory size"),
        ("0x192GB", "at least one node"),
        ("6x0GB", "not a memory size"),
        ("a-64,a-64", "names node a twice"),
        ("6x192GB,", "is not COUNTxSIZE"),
    ],
)
def test_parse_simulate_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_simulate(spec)


def _hosts_toml(tmp_path, *hosts: str):
    file = tmp_path / "hosts.toml"
    file.write_text('backend = "ring"\n' + "".join(f"[[hosts]]\n{h}\n" for h in hosts))
    return file


def test_hosts_in_ring_order_unless_ranked(tmp_path):
    file = _hosts_toml(
        tmp_path,
        'name = "a"\naddress = "10.0.0.1"\nmemory_gb = 192',
        'name = "b"\naddress = "10.0.0.2"\nmemory_gb = 512\nrank = 0',
        'name = "c"\naddress = "10.0.0.3"\nmemory_gb = 96.5',
    )
    got = [(n.name, n.memory_total) for n in nodes_from_hosts(file)]
    assert got == [("b", 512 * GIB), ("a", 192 * GIB), ("c", int(96.5 * GIB))]


def test_host_without_memory_cannot_be_planned(tmp_path):
    file = _hosts_toml(tmp_path, 'name = "studio-2"\naddress = "10.0.0.2"')
    with pytest.raises(ValueError, match="host studio-2 has no memory_gb"):
        nodes_from_hosts(file)


# --- plan files ---------------------------------------------------------------------------------


def _every_field(p: Plan) -> dict:
    """Every field of a plan, its nodes' too, as JSON gives them back."""
    return json.loads(json.dumps(asdict(p)))


def test_plan_json_round_trip(tmp_path, r1_4bit):
    p = plan(parse_simulate("2x512GB,4x192GB"), r1_4bit, context=32768)
    data = json.loads(json.dumps(plan_to_json(p)))
    assert data == _every_field(p)
    assert {"split", "order", "fits", "nodes"} <= set(data)
    file = tmp_path / "plan.json"
    file.write_text(json.dumps(data))
    assert read_plan_file(file) == p.split  # what `mlxdist quantize --plan FILE` reads


# --- the command --------------------------------------------------------------------------------


def test_plan_command_prints_a_table(capsys):
    assert plan_command(str(R1_CONFIG), None, "6x192GB", 4096, 1, 4, False) == 0
    out = capsys.readouterr().out
    print(out)
    for col in ("rank", "node", "layers", "weights GB", "KV GB", "total GB", "memory GB", "free"):
        assert col in out
    assert "split 12,10,10,10,10,9: fits" in out
    assert "node5" in out


def test_plan_command_json(capsys):
    assert plan_command(str(R1_CONFIG), None, "6x192GB", 4096, 1, 4, True) == 0
    data = json.loads(capsys.readouterr().out)
    assert sum(data["split"]) == 61 and data["fits"] is True
    assert len(data["nodes"]) == 6


def test_plan_command_does_not_fit_returns_1(capsys):
    assert plan_command(str(R1_CONFIG), None, "2x192GB", 4096, 1, 4, False) == 1
    assert "does not fit: node node0 is short by" in capsys.readouterr().out


def test_plan_command_reads_hosts_toml(tmp_path, capsys):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(
        'backend = "ring"\n'
        + "".join(
            f'[[hosts]]\nname = "studio-{i}"\naddress = "169.254.10.{i}"\nmemory_gb = 192\n'
            for i in range(1, 7)
        )
    )
    assert plan_command(str(R1_CONFIG), str(hosts), None, 4096, 1, 4, True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["order"] == [f"studio-{i}" for i in range(1, 7)]
    assert data["split"] == [12, 10, 10, 10, 10, 9]


def test_plan_command_example_hosts_toml_needs_memory():
    example = ROOT / "hosts.example.toml"
    with pytest.raises(ValueError, match="host studio-2 has no memory_gb"):
        plan_command(str(R1_CONFIG), str(example), None, 4096, 1, 4, False)


@pytest.mark.parametrize(
    "model,hosts,simulate,message",
    [
        (str(R1_CONFIG), None, None, "exactly one of --hosts"),
        (str(R1_CONFIG), "h.toml", "6x192GB", "exactly one of --hosts"),
        ("/no/such/model", None, "6x192GB", "does not exist"),
        (str(R1_CONFIG), "/no/such/hosts.toml", None, "cannot read /no/such/hosts.toml"),
    ],
)
def test_plan_command_errors(model, hosts, simulate, message):
    with pytest.raises(ValueError, match=message):
        plan_command(model, hosts, simulate, 4096, 1, 4, False)


# --- expert parallelism -------------------------------------------------------------------------
#
# R1 at 4 bits, by hand. Every quantised matrix of n weights stores n/2 bytes of 4-bit weights
# and n/64 bf16 scales and as many biases: 9n/16 bytes. Norms stay bf16, the router's
# e_score_correction_bias float32.
# - One routed expert of one MoE layer: gate, up, down of 2048 x 7168: 3 x 14,680,064 x 9/16 =
#   24,772,608 bytes; over the 58 MoE layers (61 - 3 dense): 1,436,811,264 (BYTES_PER_EXPERT).
# - Attention per layer: q_a 7168x1536 (11,010,048) + q_b 1536x24576 (37,748,736) + kv_a
#   7168x576 (4,128,768) + embed_q and unembed_out 128x128x512 (8,388,608 each) + o_proj
#   16384x7168 (117,440,512) = 187,105,280 weights x 9/16 = 105,246,720; norms 1536 + 512 +
#   7168 + 7168 = 16,384 x 2 = 32,768; so 105,279,488 a layer, 6,422,048,768 for 61.
# - Dense MLPs, 3 layers of 3 x 18432 x 7168 x 9/16 = 222,953,472: 668,860,416.
# - MoE layers but their routed experts: shared expert 3 x 2048 x 7168 x 9/16 = 24,772,608, the
#   router 256 x 7168 bf16 = 3,670,016 and its bias 256 x 4 = 1,024: 28,443,648, x 58 =
#   1,649,731,584.
# - Embeddings 129280 x 7168 x 9/16 = 521,256,960; head as much plus the final norm's 14,336.
# Replicated on every node: 6,422,048,768 + 668,860,416 + 1,649,731,584 + 521,256,960 +
# 521,271,296 = 9,783,169,024 (REPLICATED).
# KV cache, every layer on every node: 61 x (512 + 64) x 2 bytes x 4096 tokens = 287,834,112.
# Activations of a 2048-token prefill step at 4096 tokens of context (bf16):
#   rotary scores 128 heads x 2048 x 4096 x 2 = 2,147,483,648; K and V rebuilt per head over
#   the context 128 x (128 + 128) x 2 x 4096 = 268,435,456; per chunk token (4 + 8) x 7168 +
#   3 x max(18432, 8 x 2048) + 129280 = 270,592 values x 2 bytes x 2048 = 1,108,344,832;
#   in all 3,524,263,936 (ACT).
# What every node holds before its experts: 9,783,169,024 + 287,834,112 + 3,524,263,936 =
# 13,595,267,072 (FIXED).

BYTES_PER_EXPERT = 1_436_811_264
REPLICATED = 9_783_169_024
KV_4096 = 287_834_112
ACT_4096 = 3_524_263_936
FIXED = REPLICATED + KV_4096 + ACT_4096
USABLE_192 = 192 * GIB - int(192 * GIB * 0.1)  # 185,542,587,188
USABLE_128 = 128 * GIB - int(128 * GIB * 0.1)  # 123,695,058,125
USABLE_512 = 512 * GIB - int(512 * GIB * 0.1)  # 494,780,232,500


def test_r1_4bit_expert_sizes_by_hand(r1_4bit):
    assert FIXED == 13_595_267_072
    assert r1_4bit.bytes_per_expert == BYTES_PER_EXPERT and r1_4bit.num_experts == 256
    assert r1_4bit.replicated_bytes == REPLICATED
    assert r1_4bit.replicated_bytes + 256 * BYTES_PER_EXPERT == r1_4bit.total_bytes
    assert activation_bytes_at(r1_4bit.activation, 4096) == ACT_4096


@pytest.mark.parametrize(
    "cluster,counts,free",
    [
        # Equal nodes: 256 = 6 x 42 + 4, the first four take one more, as even_split deals them.
        # Node 0: 9,783,169,024 + 43 x 1,436,811,264 = 71,566,053,376 of weights, plus the KV
        # cache and activations: 75,378,151,424; free 185,542,587,188 - that = 110,164,435,764.
        ("6x192GB", [43, 43, 43, 43, 42, 42], USABLE_192 - (FIXED + 43 * BYTES_PER_EXPERT)),
        # 64 each: 9,783,169,024 + 64 x 1,436,811,264 = 101,739,089,920 of weights, 105,551,187,968
        # in all, so 18,143,870,157 free of 123,695,058,125 (14.7%): it fits.
        ("4x128GB", [64] * 4, USABLE_128 - (FIXED + 64 * BYTES_PER_EXPERT)),
        # Equal fill t: (FIXED + c x BYTES_PER_EXPERT) / usable for every node, counts adding up
        # to 256: t = (256 x 1,436,811,264 + 3 x FIXED) / (494,780,232,500 + 2 x 185,542,587,188)
        # = 0.47191, so c = 153.0 for the 512 GB node and 51.5 for each 192 GB one. Rounded:
        # 154,51,51 fills the nodes at most 0.47468 (the 512's), 153,52,51 at 0.47595 (a
        # 192's): the first is the plan. The 512's free memory: 494,780,232,500 -
        # (FIXED + 154 x 1,436,811,264) = 259,916,030,772.
        ("m3ultra-512,2x192GB", [154, 51, 51], USABLE_512 - (FIXED + 154 * BYTES_PER_EXPERT)),
    ],
)
def test_r1_4bit_expert_plan(r1_4bit, cluster, counts, free):
    p = plan_experts(parse_simulate(cluster), r1_4bit)
    print(f"R1 4-bit experts on {cluster}: {p.experts}, {p.message}")
    assert p.fits and p.message == "fits" and p.parallel == "expert"
    assert p.experts == counts and p.split == [61]
    assert p.nodes[0].free_bytes == free
    for row, c in zip(p.nodes, counts):
        assert row.experts == c and row.layers == 61 and row.first_layer == 0
        assert row.weights_bytes == REPLICATED + c * BYTES_PER_EXPERT
        assert (row.kv_bytes, row.activation_bytes) == (KV_4096, ACT_4096)
        assert row.total_bytes == FIXED + c * BYTES_PER_EXPERT
    if len(set(n.memory_total for n in parse_simulate(cluster))) == 1:
        assert p.experts == even_split(256, len(counts))  # what the runtime deals by default


def test_r1_expert_plan_refuses_nodes_too_small_for_the_replicated_part(r1_4bit):
    # 8 GB Macs: 8 x 2**30 - 10% = 7,730,941,133 bytes, less than the 13.6 GB of FIXED
    p = plan_experts(parse_simulate("8x8GB"), r1_4bit)
    assert not p.fits and len(p.shortfalls) == 8
    assert p.shortfalls["node0"] == FIXED + 32 * BYTES_PER_EXPERT - 7_730_941_133
    assert p.message.startswith("does not fit: node0 (7.7 GB), node1 (7.7 GB)")
    assert "cannot hold even the 13.6 GB every node holds before any expert" in p.message
    print(p.message)


def test_r1_expert_plan_short_of_memory_overall(r1_4bit):
    # 2 x 192 GB: 128 experts each, FIXED + 128 x 1,436,811,264 = 197,507,108,864 needed
    p = plan_experts(parse_simulate("2x192GB"), r1_4bit)
    short = FIXED + 128 * BYTES_PER_EXPERT - USABLE_192
    assert p.shortfalls == {"node0": short, "node1": short}
    gb = f"{short / GB:.1f}"
    assert (
        p.message == f"does not fit: node node0 is short by {gb} GB, node node1 is short by {gb} GB"
    )


def test_context_and_batch_grow_every_nodes_kv_and_activations(r1_4bit):
    long = plan_experts(parse_simulate("6x192GB"), r1_4bit, context=32768, batch=2)
    # KV: 61 x 1152 x 32768 x 2; activations: 2 x (2048 x 32768 x 256 + 32768 x 65536 +
    # 2048 x 541,184)
    kv = 61 * 1152 * 32768 * 2
    act = 2 * (2048 * 32768 * 256 + 32768 * 65536 + 2048 * 541_184)
    assert all(r.kv_bytes == kv and r.activation_bytes == act for r in long.nodes)
    assert long.fits and long.experts == [43, 43, 43, 43, 42, 42]


def expert_model(per_expert_gb: float, replicated_gb: float, experts: int) -> ModelSpec:
    """One MoE layer of `experts` experts of per_expert_gb each; the rest replicated_gb."""
    rest = int(replicated_gb * GB)
    e = int(per_expert_gb * GB) * experts
    return ModelSpec("moe", [rest + e], 0, 0, False, 0, [e], experts, ActivationSpec())


@pytest.mark.parametrize(
    "memory,experts,expected",
    [
        # 10 GiB nodes (9.66 GB usable), 1 GB experts, 1 GB replicated: dealt evenly
        ((10, 10), 8, [4, 4]),
        ((10, 10, 10), 8, [3, 3, 2]),
        # 30 GiB usable 27 GiB = 29.0 GB and 10 GiB usable 9.66 GB: (1 + c) / usable equal at
        # 26 / 38.65 = 0.673, c0 = 18.5, c1 = 5.5 of 24; whole: 19,5 fills at most 20/29.0 =
        # 0.69 against 18,6 filling the small node 7/9.66 = 0.72
        ((30, 10), 24, [19, 5]),
        ((10, 30), 24, [5, 19]),  # the order of the nodes is the order of the ranks
        # a node with less memory takes fewer experts, never none
        ((64, 4, 64), 12, [6, 1, 5]),
    ],
)
def test_more_memory_takes_more_experts(memory, experts, expected):
    p = plan_experts(nodes(*memory), expert_model(1.0, 1.0, experts))
    assert p.experts == expected and sum(p.experts) == experts
    assert all(c >= 1 for c in p.experts)


def _compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize(
    "experts,per,fixed,usable",
    [
        (8, 3, 5, [40, 30, 20]),
        (12, 2, 0, [10, 30, 20, 10]),
        (9, 7, 10, [100, 100]),
        (7, 5, 50, [10, 10, 10]),  # nothing fits: the overload is spread
        (10, 1, 3, [13, 7, 29]),
    ],
)
def test_expert_counts_are_lexicographically_smallest(experts, per, fixed, usable):
    def ratios(counts):
        return tuple(sorted(((fixed + c * per) / u for c, u in zip(counts, usable)), reverse=True))

    got = best_expert_counts(experts, per, fixed, usable)
    best = min(ratios(c) for c in _compositions(experts, len(usable)))
    assert ratios(got) == best and sum(got) == experts and min(got) >= 1


@pytest.mark.parametrize(
    "cluster,model,message",
    [
        (nodes(64), expert_model(1.0, 1.0, 8), "needs at least 2 nodes"),
        (nodes(*[64] * 9), expert_model(1.0, 1.0, 8), "cannot share 8 experts over 9 nodes"),
        (nodes(64, 64), uniform(4, 1.0), "has no routed experts"),
    ],
)
def test_expert_plan_refuses(cluster, model, message):
    with pytest.raises(ValueError, match=message):
        plan_experts(cluster, model)


def test_activation_spec_of_a_dense_model():
    llama = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336}
    llama |= {"vocab_size": 32000, "torch_dtype": "bfloat16", "num_attention_heads": 32}
    spec = activation_spec(llama)
    # fused attention: no scores; per token (4 x 4096 + 3 x 14336 + 32000) x 2 = 182,784
    assert spec == ActivationSpec(0, 0, 182_784)
    assert activation_bytes_at(spec, 100) == 100 * 182_784  # a prompt shorter than a chunk


def test_expert_plan_json_round_trip_and_quantize_reads_it(tmp_path, r1_4bit):
    p = plan_experts(parse_simulate("m3ultra-512,2x192GB"), r1_4bit)
    data = json.loads(json.dumps(plan_to_json(p)))
    assert data == _every_field(p)
    assert data["parallel"] == "expert" and data["experts"] == [154, 51, 51]
    file = tmp_path / "plan.json"
    file.write_text(json.dumps(data))
    assert read_expert_plan_file(file) == [154, 51, 51]  # `mlxdist quantize --plan FILE`
    with pytest.raises(ValueError, match="plans expert parallelism"):
        read_plan_file(file)


def test_plan_command_expert_table(capsys):
    assert plan_command(str(R1_CONFIG), None, "6x192GB", 4096, 1, 4, False, parallel="expert") == 0
    out = capsys.readouterr().out
    print(out)
    for col in ("experts", "weights GB", "KV GB", "act. GB", "total GB", "GPU limit GB", "free GB"):
        assert col in out
    assert re.search(r"│ +43 │", out) and "experts 43,43,43,43,42,42: fits" in out
    assert "expert" in out.split("predicted decode")[1]  # the performance model's expert mode
    assert "pipeline (this split)" not in out


def test_plan_command_expert_json(capsys):
    code = plan_command(str(R1_CONFIG), None, "6x192GB", 4096, 1, 4, True, parallel="expert")
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["experts"] == [43, 43, 43, 43, 42, 42]
    assert list(data["prediction"]["modes"]) == ["expert"]
    assert data["prediction"]["modes"]["expert"]["fits"] is True
    assert data["nodes"][5]["experts"] == 42


def test_plan_command_expert_does_not_fit_returns_1(capsys):
    assert plan_command(str(R1_CONFIG), None, "8x8GB", 4096, 1, 4, False, parallel="expert") == 1
    assert "cannot hold even the 13.6 GB" in capsys.readouterr().out


def test_pipeline_plan_prints_the_expert_rows_memory_as_the_expert_planner_counts_it(capsys):
    # 4 x 128 GB under Metal's working set, 96 GiB = 103.1 GB usable each: the pipeline fits
    # (94.4 GB a node on average); expert mode needs FIXED + 64 experts = 105.6 GB on every node
    assert plan_command(str(R1_CONFIG), None, "4x128GB", 4096, 1, 4, True) == 0
    modes = json.loads(capsys.readouterr().out)["prediction"]["modes"]
    assert modes["pipeline"]["fits"] is True and modes["expert"]["fits"] is False


def test_mlxdist_plan_parallel_expert_command():
    args = ("plan", str(R1_CONFIG), "--simulate", "6x192GB", "--json")
    result = run_cli(*args, "--parallel", "expert")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["experts"] == [43, 43, 43, 43, 42, 42]
    wrong = run_cli(*args, "--parallel", "experts")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip() == (
        "error: --parallel must be auto, pipeline, expert, tensor, not 'experts'"
    )


def test_tensor_launch_check_uses_the_planners_headroom(tiny_r1):
    """choose_tensor: heads must divide, and 1/N of the weights and KV cache must fit each
    node's memory less the planner's headroom (10% of its total)."""
    from launcher.cluster import choose_tensor
    from launcher.local import LaunchError
    from launcher.remote import Node

    spec = model_spec_from_folder(tiny_r1)
    kv = spec.kv_bytes_per_token_per_layer * spec.num_layers * 64
    need = (spec.total_bytes + kv) // 2

    def node(name: str, total: int, available: int) -> Node:
        facts = {"memory_total": total, "memory_available": available}
        return Node(name, "10.0.0.1", None, facts)

    total = 10 * need
    roomy = node("a", total, need + total // 10)  # exactly enough after the headroom
    assert choose_tensor(tiny_r1, [roomy, roomy], 64) == [spec.num_layers] * 2
    short = node("b", total, need + total // 10 - 1)
    with pytest.raises(LaunchError, match=r"but b has .* GB to spare"):
        choose_tensor(tiny_r1, [roomy, short], 64)
    with pytest.raises(LaunchError, match="num_attention_heads=4 does not divide by 3"):
        choose_tensor(tiny_r1, [roomy] * 3, 64)

"""`mlxdist testing fit-mtp` fits tiny-r1's MTP layer to the model's own continuations: its
held-out acceptance rises, only the MTP layer's tensors change, and they load back."""

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from mlxdist.runtime.stage import load_stage
from mlxdist.testing.fit_mtp import continuations, held_out_count, load_layer, score
from mlxdist.testing.tiny_r1 import build_config, make_r1
from quantize.checkpoint import safetensors_layout, weight_map

STEPS, SEQUENCES, TOKENS, SEED, LR = "60", "16", "32", "3", "1e-2"
LINE = re.compile(
    r"held-out acceptance ([\d.]+) -> ([\d.]+) \(fitted ([\d.]+)\), loss ([\d.]+) -> ([\d.]+)"
)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny-r1 before (an untouched copy) and after fit-mtp, and what the command printed."""
    base = tmp_path_factory.mktemp("fit-mtp")
    model = make_r1(base / "tiny-r1", "tiny")
    original = base / "original"
    shutil.copytree(model, original)
    r = run_cli(
        "testing", "fit-mtp", str(model), "--steps", STEPS, "--sequences", SEQUENCES,
        "--tokens", TOKENS, "--seed", SEED, "--lr", LR,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = LINE.search(r.stdout)
    assert m, r.stdout
    return model, original, [float(x) for x in m.groups()]


def tensor_bytes(path: Path) -> dict[str, bytes]:
    out = {}
    for file in sorted(set(weight_map(path).values())):
        start, entries = safetensors_layout(path / file)
        data = (path / file).read_bytes()
        for name, entry in entries.items():
            a, b = entry["data_offsets"]
            out[name] = data[start + a : start + b]
    return out


def test_acceptance_rises(fitted):
    _, _, (before, after, fitted_acc, loss_before, loss_after) = fitted
    print(f"acceptance {before:.3f} -> {after:.3f} (fitted {fitted_acc:.3f})")
    # Seen: 0.0 -> 0.0625 (8 of 128 held-out positions), loss 6.98 -> 6.40; the default
    # settings reach about 20%.
    assert after > before
    assert after >= 0.04
    assert loss_after < loss_before - 0.3
    assert abs(after - fitted_acc) <= 0.05  # FP8 and BF16 rounding of the stored layer


def test_only_the_mtp_layer_changes(fitted):
    model, original, _ = fitted
    assert weight_map(model) == weight_map(original)
    for file in set(weight_map(model).values()):
        assert safetensors_layout(model / file) == safetensors_layout(original / file)
    new, old = tensor_bytes(model), tensor_bytes(original)
    changed = {k for k in new if new[k] != old[k]}
    assert changed and all(k.startswith("model.layers.4.") for k in changed)
    for name in ("eh_proj.weight", "self_attn.kv_b_proj.weight", "self_attn.q_a_proj.weight"):
        assert f"model.layers.4.{name}" in changed
    for name in ("embed_tokens.weight", "mlp.experts.0.up_proj.weight", "mlp.gate.weight"):
        assert f"model.layers.4.{name}" not in changed  # frozen


def test_written_layer_scores_as_printed(fitted):
    """The layer read back from the files scores on the same held-out continuations as the
    command said."""
    model, _, (_, after, _, _, loss_after) = fitted
    stage = load_stage(model, [4], 0)
    count = held_out_count(int(SEQUENCES))
    held = continuations(stage, count, 4, int(TOKENS), [int(SEED), 1], sampled=False)
    s = score(load_layer(model, stage), stage.model.lm_head, held)
    assert s.acceptance == pytest.approx(after, abs=0.01)
    assert s.loss == pytest.approx(loss_after, abs=0.01)


def test_the_runtime_drafts_what_the_fit_predicts(fitted):
    """The serving runtime's drafter (built as a rank builds it: the stage's hidden states, its
    final norm, its head) drafts, after each held-out position, the fitted layer's own choice:
    fit-mtp and the runtime feed the layer the same input."""
    import mlx.core as mx

    from mlxdist.runtime.mtp_drafter import MTPDrafter
    from mlxdist.runtime.stage import load_mtp_layer
    from mlxdist.testing.fit_mtp import predict

    model, _, _ = fitted
    stage = load_stage(model, [4], 0)
    held = continuations(stage, 1, 4, int(TOKENS), [int(SEED), 2], sampled=False)
    want = mx.argmax(predict(load_layer(model, stage), stage.model.lm_head, held), axis=-1)
    tokens = held.tokens[0].tolist()
    hidden = stage.forward(stage.embed(mx.array([tokens])), stage.make_cache())  # before norm
    drafter = MTPDrafter(load_mtp_layer(model), 1, stage.model.lm_head, stage.inner.norm)
    drafter.start(1)
    drafts = [drafter.feed(1, hidden[:, :4], tokens[:4], tokens[4])[0]]
    for i in range(4, len(tokens) - 1):  # one decode step each
        drafts += drafter.feed(1, hidden[:, i : i + 1], tokens[i : i + 1], tokens[i + 1])
    agree = sum(d == w for d, w in zip(drafts, want[0, 3:].tolist()))
    assert agree >= len(drafts) - 1  # FP8/BF16 rounding of the stored layer may flip a near-tie


def test_refuses_a_model_without_mtp(tmp_path):
    # R1's config.json without the MTP layer: refused before any tensor is read.
    config = build_config("tiny", {"num_nextn_predict_layers": 0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = run_cli("testing", "fit-mtp", str(tmp_path))
    assert r.returncode == 1
    assert "no multi-token-prediction layer" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_refuses_a_model_not_in_r1_format(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    r = run_cli("testing", "fit-mtp", str(tmp_path), "--steps", "5")
    assert r.returncode == 1
    assert "not an R1-format checkpoint" in r.stderr and "Traceback" not in r.stderr

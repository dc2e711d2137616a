"""`mlxdist launch --local N` with --parallel auto (the default): it states its choice in one line
before any rank starts, then runs that mode. Real processes, real ranks."""

import re

import pytest
from conftest import rank_pids, run_cli


@pytest.mark.cluster
def test_a_local_launch_states_its_choice(tiny_r1, tmp_path):
    result = run_cli(
        "launch",
        str(tiny_r1),
        "--local",
        "2",
        "--prompt",
        "hi",
        "--max-tokens",
        "4",
        env={"HOME": str(tmp_path)},  # the node id it reads (collect) lands here, not in ~
    )
    print(result.stderr)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("auto: ")]
    loading = [i for i, line in enumerate(lines) if line.startswith("loading ")]
    assert len(said) == 1 and loading and said[0] < loading[0]
    # Two ranks share one machine's bandwidth: the pipeline's stages read in turn at all of it,
    # so it wins over loopback; the line gives every mode's prediction.
    pattern = (
        r"auto: pipeline parallel over loopback, [\d.]+ tok/s predicted "
        r"\(expert [\d.]+, tensor [\d.]+\)"
    )
    assert re.fullmatch(pattern, lines[said[0]]), lines[said[0]]
    assert "(layers [2, 2]; prompt cache " in lines[loading[0]]
    assert rank_pids(str(tiny_r1)) == []

"""`mlxdist doctor`: every capture folder replayed through the command, the checks as tables over
readings, capture folders edited into the cases doctor must catch (a bridge over a loop, a
missing RDMA device, a wired limit too low for the plan), and clocks: pure, then against real
agents, one of them with its clock set two minutes ahead."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from typer.testing import CliRunner

from launcher.doctor import (
    DISABLE_BRIDGE,
    FAIL,
    IBV,
    IFCONFIG,
    MISSING,
    OK,
    SYSCTL,
    WARN,
    MlxReading,
    Readings,
    SecretReading,
    check_advertisement,
    check_clock,
    check_macos,
    check_metal,
    check_mlx,
    check_secret,
    generation,
    link_gbps,
    run_checks,
)
from launcher.doctor_readings import (
    MLX_FILE,
    load_mlx,
    probe_agent,
    read_capture,
    run_commands,
    save_mlx,
)
from launcher.hostfacts import MACOS_COMMANDS, replay_runner
from launcher.hostfile import free_ports
from launcher.secret import create_secret
from mlxdist.cli import app

MACOS = Path(__file__).parent / "data" / "macos"
CHECKS = [
    "macOS",
    "chip",
    "MLX",
    "Metal",
    "memory",
    "Thunderbolt",
    "bridge",
    "RDMA",
    "secret",
    "agent",
    "clock",
    "advertisement",
]
# Every folder holding at least one command's output, the real captures under real/ included.
CAPTURES = sorted({p.parent for p in MACOS.rglob("*") if p.name in MACOS_COMMANDS})


def doctor(*args: str, config: Path) -> tuple[int, dict[str, tuple[str, str]], str]:
    """Runs `mlxdist doctor` in this process: (exit code, check -> (status, message), output)."""
    result = CliRunner().invoke(app, ["doctor", *args], env={"MLXDIST_CONFIG": str(config)})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result.exit_code, table_rows(result.output), result.output


def table_rows(output: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if line.startswith("│") and len(cells) == 3:
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def studio(tmp_path: Path, name: str = "studio-1") -> Path:
    folder = tmp_path / name
    shutil.copytree(MACOS / name, folder)
    return folder


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


# ---- every capture through the command ----


def test_the_capture_folders_are_found():
    names = {p.relative_to(MACOS).parts[0] for p in CAPTURES}
    assert {"studio-1", "studio-2", "studio-3"} <= names


@pytest.mark.parametrize("folder", CAPTURES, ids=lambda p: str(p.relative_to(MACOS)))
def test_doctor_from_each_capture(folder, tmp_path):
    code, rows, output = doctor("--from", str(folder), config=tmp_path)
    assert list(rows) == CHECKS, output
    assert all(status in (OK, WARN, FAIL, MISSING) for status, _ in rows.values())
    assert code == (1 if any(s == FAIL for s, _ in rows.values()) else 0)
    # A file the folder lacks is reported as missing by the checks that read it, never fatal.
    if not (folder / SYSCTL).exists():
        assert rows["macOS"] == (MISSING, f"no {SYSCTL}: not in {folder}")
    assert output.rstrip().splitlines()[-1].startswith(f"advertisement: {rows['advertisement'][0]}")


@pytest.mark.parametrize("name", ["studio-1", "studio-2", "studio-3"])
def test_doctor_on_the_studios(name, tmp_path):
    """Complete captures: every host check runs; the advertisement fits and is printed."""
    code, rows, output = doctor("--from", str(MACOS / name), config=tmp_path)
    assert code == 0, output
    for check in ("macOS", "chip", "memory", "Thunderbolt", "bridge", "RDMA", "advertisement"):
        assert rows[check][0] != MISSING, (check, rows[check])
    assert rows["advertisement"][0] == OK
    assert f"  host={name}" in output
    # These run macOS 15: the ring works, RDMA needs 26.2.
    assert rows["macOS"][0] == WARN and "26.2" in rows["macOS"][1]


def test_doctor_in_a_real_process(tmp_path):
    done = run_cli(
        "doctor", "--from", str(MACOS / "studio-3"), env={"MLXDIST_CONFIG": str(tmp_path)}
    )
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout)
    assert list(rows) == CHECKS and "Traceback" not in done.stderr
    assert rows["Thunderbolt"] == (
        OK,
        "6 ports, 2 cabled to another Mac: en2 40 Gb/s TB4, en4 40 Gb/s TB4 "
        "(a Thunderbolt 4 Mac: the ring backend over TCP)",
    )


def test_doctor_refuses_capture_and_from_together(tmp_path):
    result = CliRunner().invoke(app, ["doctor", "--capture", "a", "--from", "b"])
    assert result.exit_code == 1 and "not both" in result.output


@pytest.mark.skipif(sys.platform == "darwin", reason="what doctor says on a machine that is no Mac")
def test_doctor_on_linux_checks_what_applies(tmp_path):
    create_secret(tmp_path / "secret")
    code, rows, output = doctor(config=tmp_path)
    assert "checks are for macOS" in output
    assert rows["macOS"] == (MISSING, f"no {SYSCTL}: not a Mac ({sys.platform})")
    assert rows["MLX"][0] == OK and rows["secret"][0] == OK
    assert rows["Metal"][0] == MISSING and rows["advertisement"][0] == OK
    assert code == 0


# ---- the cases doctor must name, each in its one line ----


def test_bridge_up_over_a_loop(tmp_path):
    """en2 and en3 are each cabled to a Mac; put them in the up bridge0 as macOS does."""
    folder = studio(tmp_path)
    edit(
        folder / IFCONFIG,
        "\tmember: en4 ",
        "\tmember: en2 flags=3<LEARNING,DISCOVER>\n"
        "\tmember: en3 flags=3<LEARNING,DISCOVER>\n\tmember: en4 ",
    )
    code, rows, output = doctor("--from", str(folder), config=tmp_path)
    assert code == 1, output
    status, message = rows["bridge"]
    assert status == FAIL
    assert message.startswith("bridge0 is up and bridges en2, en3, each cabled to a Mac")
    assert message.endswith(DISABLE_BRIDGE)
    assert DISABLE_BRIDGE == 'sudo networksetup -setnetworkserviceenabled "Thunderbolt Bridge" off'


def test_bridge_down_over_a_loop_is_a_warning(tmp_path):
    folder = studio(tmp_path)
    edit(folder / IFCONFIG, "\tmember: en4 ", "\tmember: en2 x\n\tmember: en3 x\n\tmember: en4 ")
    edit(folder / IFCONFIG, "bridge0: flags=8863<UP,", "bridge0: flags=8862<")
    _, rows, _ = doctor("--from", str(folder), config=tmp_path)
    assert rows["bridge"][0] == WARN and "en2, en3 is cabled to a Mac" in rows["bridge"][1]


def test_missing_rdma_device(tmp_path):
    """macOS 26.2 with RDMA devices for en2 only: en3, also cabled, has none."""
    folder = studio(tmp_path)
    edit(folder / SYSCTL, "kern.osproductversion: 15.3.2", "kern.osproductversion: 26.2")
    (folder / IBV).write_text(
        "    device          \t   node GUID\n    ------          \t----------------\n"
        "    rdma_en2        \t8096a9d9edbaac05\n    rdma_en4        \t8296a9d9edbaac05\n"
    )
    _, rows, _ = doctor("--from", str(folder), config=tmp_path)
    status, message = rows["RDMA"]
    assert status == WARN
    assert message.startswith("en3 cabled to a Mac but no rdma_en3: RDMA is off")
    assert "`rdma_ctl enable`" in message and "recovery mode" in message
    assert rows["macOS"][0] == OK
    # With the device there too, both cabled ports are ready.
    edit(folder / IBV, "rdma_en4", "rdma_en3")
    _, rows, _ = doctor("--from", str(folder), config=tmp_path)
    assert rows["RDMA"] == (OK, "rdma_en2, rdma_en3 ready for jaccl")


@pytest.mark.parametrize(
    "need_gb,status,says",
    [
        # iogpu.wired_limit_mb=100000 lets Metal wire 104.9 GB of the 549.8 GB.
        ("100", OK, "the plan's 100 GB fits"),
        # The planner's fix: the memory less its 10% headroom,
        # (549755813888 - 54975581388) // 2**20 = 471859 MiB.
        (
            "200",
            FAIL,
            "the plan puts 200 GB on this Mac but the GPU can wire only 105 GB "
            "(iogpu.wired_limit_mb=100000): sudo sysctl iogpu.wired_limit_mb=471859",
        ),
        ("520", FAIL, "the plan puts 520 GB on this Mac, more than it can give the GPU"),
    ],
)
def test_wired_limit_too_low_for_the_plan(tmp_path, need_gb, status, says):
    folder = studio(tmp_path)
    with open(folder / SYSCTL, "a") as f:
        f.write("iogpu.wired_limit_mb: 100000\n")
    code, rows, output = doctor("--from", str(folder), "--need-gb", need_gb, config=tmp_path)
    assert rows["memory"][0] == status and says in rows["memory"][1], rows["memory"]
    assert code == (1 if status == FAIL else 0)


def test_memory_uses_metal_working_set_from_the_capture(tmp_path):
    folder = studio(tmp_path)
    save_mlx(folder, MlxReading("0.32.4", True, 400 * 10**9))
    _, rows, _ = doctor("--from", str(folder), "--need-gb", "401", config=tmp_path)
    assert (
        rows["memory"][0] == FAIL and "wire only 400 GB (Metal's working set)" in rows["memory"][1]
    )
    assert rows["MLX"] == (OK, "MLX 0.32.4") and rows["Metal"][0] == OK


# ---- capture, then replay ----


def test_capture_keeps_each_output_and_replays_the_same(tmp_path):
    """A capture made by running the commands (answered here by a studio's folder) replays as
    that studio: same files, same rows."""
    out = tmp_path / "capture"
    files = run_commands(replay_runner(MACOS / "studio-2"), folder=out)
    assert files[IBV] is None and not (out / IBV).exists()  # the studio has no ibv_devices
    for name, text in files.items():
        if text is not None:
            assert (out / name).read_text() == (MACOS / "studio-2" / name).read_text() == text
    assert read_capture(out) == files
    save_mlx(out, MlxReading("0.32.4", True, 123))
    assert load_mlx(out) == MlxReading("0.32.4", True, 123)
    _, captured, _ = doctor("--from", str(out), config=tmp_path)
    _, original, _ = doctor("--from", str(MACOS / "studio-2"), config=tmp_path)
    # What MLX saw (and so the advertised MLX version) is in the capture only.
    mlx_rows = ("MLX", "Metal", "memory", "advertisement")
    assert {k: v for k, v in captured.items() if k not in mlx_rows} == {
        k: v for k, v in original.items() if k not in mlx_rows
    }
    (out / MLX_FILE).write_text("not json")
    assert load_mlx(out) is None


# ---- pure checks over readings ----


def readings(**files: str | None) -> Readings:
    return Readings({name: files.get(name) for name in MACOS_COMMANDS})


@pytest.mark.parametrize(
    "version,status",
    [("15.3.2", WARN), ("26.1", WARN), ("26.2", OK), ("26.10", OK), ("27.0", OK)],
)
def test_macos_version(version, status):
    row = check_macos(readings(**{SYSCTL: f"kern.osproductversion: {version}\n"}))
    assert row.status == status


@pytest.mark.parametrize(
    "speed,gbps,gen",
    [("80 Gb/s", 80, 5), ("120 Gb/s", 120, 5), ("40 Gb/s", 40, 4), ("Up to 120 Gb/s", None, None)],
)
def test_link_speed_and_generation(speed, gbps, gen):
    assert link_gbps(speed) == gbps
    if gbps is not None:
        assert generation(gbps) == gen


@pytest.mark.parametrize(
    "secret,status,says",
    [
        (None, MISSING, "not checked"),
        (SecretReading("/s", None), FAIL, "no secret at /s: run mlxdist init"),
        (SecretReading("/s", 0o644), FAIL, "/s has mode 0644, readable by others: chmod 600 /s"),
        (SecretReading("/s", 0o640), FAIL, "chmod 600 /s"),
        (SecretReading("/s", 0o600), OK, "/s (mode 0600)"),
        (SecretReading("/s", 0o400), OK, "/s (mode 0400)"),
    ],
)
def test_secret_mode(secret, status, says):
    r = readings()
    r.secret = secret
    row = check_secret(r)
    assert row.status == status and says in row.message


@pytest.mark.parametrize(
    "mlx,on_mac,mlx_status,metal_status",
    [
        (None, True, MISSING, MISSING),
        (MlxReading(None, False), True, FAIL, FAIL),
        (MlxReading("0.31.1", True), True, FAIL, OK),
        (MlxReading("0.32.4", True), True, OK, OK),
        (MlxReading("0.32.4", False), True, OK, FAIL),
        (MlxReading("0.32.4", False), False, OK, MISSING),
    ],
)
def test_mlx_and_metal(mlx, on_mac, mlx_status, metal_status):
    r = readings()
    r.mlx, r.on_mac = mlx, on_mac
    assert (check_mlx(r).status, check_metal(r).status) == (mlx_status, metal_status)


def test_no_readings_at_all_gives_a_row_per_check():
    rows = run_checks(readings())
    assert [row.check for row in rows] == CHECKS[:-1]
    assert all(row.status == MISSING for row in rows)


def test_unreadable_output_is_missing_not_fatal():
    rows = {
        row.check: row
        for row in run_checks(
            readings(
                **{
                    "system_profiler-SPThunderboltDataType.json": "{not json",
                    "networksetup-listallhardwareports.txt": "",
                    IFCONFIG: "",
                }
            )
        )
    }
    assert (
        rows["Thunderbolt"].status == MISSING and "could not be read" in rows["Thunderbolt"].message
    )
    assert rows["bridge"].status == OK  # an empty ifconfig has no bridge


@pytest.mark.parametrize(
    "skews,status,says",
    [
        ({}, MISSING, "no agent told its time"),
        ({"a": 0.4, "b": -1.2}, OK, "within 1.2 s of 2 agents (window 30 s)"),
        ({"a": 20.0}, WARN, "this clock is 20.0 s behind a's, near the 30 s signing window"),
        ({"a": 1.0, "b": -45.0}, FAIL, "this clock is 45.0 s ahead of b's, past the 30 s"),
        ({"a": 31.0}, FAIL, "past the 30 s signing window: turn on network time"),
    ],
)
def test_clock_skew(skews, status, says):
    row = check_clock(skews)
    assert row.status == status and says in row.message, row


def test_advertisement_fit():
    assert check_advertisement({"id": "x" * 200, "cluster": "home"}).status == OK
    row = check_advertisement({"id": "x" * 253, "cluster": "home"})  # "id=" makes it 256
    assert row.status == FAIL and "id" in row.message
    assert check_advertisement(None, "TXT value tb is over 255 bytes").status == FAIL


# ---- real agents: reachable, and a clock two minutes ahead ----

# argv: root, port, clock offset in seconds
AGENT = """
import sys, time
offset = float(sys.argv[3])
if offset:
    real = time.time
    time.time = lambda: real() + offset  # this agent's clock runs `offset` seconds ahead
from pathlib import Path
from launcher.agent import create_agent_app, serve_agent
from launcher.secret import load_secret

root = Path(sys.argv[1])
app = create_agent_app(load_secret(root / "secret"), root / "models", dict, runs_dir=root / "runs")
serve_agent(app, ["127.0.0.1"], int(sys.argv[2]), log_level="warning")
"""


@pytest.mark.cluster
def test_doctor_against_real_agents(tmp_path):
    secret_path = create_secret(tmp_path / "secret")
    secret = secret_path.read_text().strip()
    ports = free_ports(2)
    offsets = [0.0, 120.0]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", AGENT, str(tmp_path), str(port), str(offset)], cwd=ROOT
        )
        for port, offset in zip(ports, offsets)
    ]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        deadline = time.monotonic() + 60
        for url, proc in zip(urls, procs):
            while probe_agent(url, bytes.fromhex(secret)).status is None:
                assert proc.poll() is None and time.monotonic() < deadline, "no agent"
                time.sleep(0.2)
        args = ["--agent", urls[0], "--agent", urls[1], "--secret-file", str(secret_path)]
        code, rows, output = doctor(*args, config=tmp_path)
        assert rows[f"agent {urls[0]}"] == (OK, f"{urls[0]} answers signed requests"), output
        status, message = rows[f"agent {urls[1]}"]
        assert status == FAIL and "refuses our requests as stale" in message
        status, message = rows["clock"]
        assert status == FAIL, output
        m = re.search(rf"this clock is ([\d.]+) s behind {re.escape(urls[1])}'s", message)
        assert m and abs(float(m.group(1)) - 120) < 3, message  # the Date header: whole seconds
        assert "past the 30 s signing window" in message
        assert rows["secret"][0] == OK and code == 1
        # The agent in step alone: its /health tells its time to the millisecond.
        code, rows, output = doctor(
            "--agent", urls[0], "--secret-file", str(secret_path), config=tmp_path
        )
        assert rows["clock"][0] == OK and "of 1 agent (window 30 s)" in rows["clock"][1], output
        reading = probe_agent(urls[0], bytes.fromhex(secret))
        assert reading.status == 200 and reading.agent_time is not None
        assert abs(reading.skew()) < 1
        # A wrong secret is named as such, and a port nobody listens on as unreachable.
        other = create_secret(tmp_path / "other")
        dead = f"http://127.0.0.1:{free_ports(1)[0]}"
        _, rows, _ = doctor(
            "--agent", urls[0], "--agent", dead, "--secret-file", str(other), config=tmp_path
        )
        assert rows[f"agent {urls[0]}"][0] == FAIL
        assert "holds another secret" in rows[f"agent {urls[0]}"][1]
        assert rows[f"agent {dead}"][0] == FAIL and "cannot reach" in rows[f"agent {dead}"][1]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(15)


@pytest.mark.parametrize(
    "name,text",
    [
        ("system_profiler-SPDisplaysDataType.json", "[]"),
        ("system_profiler-SPThunderboltDataType.json", "[]"),
        ("system_profiler-SPThunderboltDataType.json", '{"SPThunderboltDataType": [1]}'),
        ("system_profiler-SPThunderboltDataType.json", '{"SPThunderboltDataType": {"a": 1}}'),
        ("mlx.json", '{"version": 5}'),
        ("sysctl.txt", "\x00\x01 garbage"),
    ],
)
def test_a_damaged_capture_file_is_a_row_not_a_traceback(tmp_path, name, text):
    folder = tmp_path / "mac"
    shutil.copytree(MACOS / "studio-1", folder)
    (folder / name).write_text(text)
    code, rows, out = doctor("--from", str(folder), config=tmp_path)
    assert "Traceback" not in out and code in (0, 1)
    assert len(rows) == len(doctor("--from", str(MACOS / "studio-1"), config=tmp_path)[1])


def test_a_chip_not_in_the_table_is_a_warning(tmp_path):
    folder = tmp_path / "mac"
    shutil.copytree(MACOS / "studio-1", folder)
    sysctl = (folder / "sysctl.txt").read_text().replace("Apple M3 Ultra", "Apple M9 Giga")
    (folder / "sysctl.txt").write_text(sysctl)
    _, rows, _ = doctor("--from", str(folder), config=tmp_path)
    assert rows["chip"][0] == WARN and "Apple M9 Giga" in rows["chip"][1]
    assert "not in mlxdist's chip table" in rows["chip"][1]

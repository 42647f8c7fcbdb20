"""Device and CPU-thread choice."""

from __future__ import annotations

import subprocess
import sys

import pytest

from skyfall.devices import choose_threads
from skyfall.errors import ConfigError


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """A fake machine: ``machine(cores, busy)``; OMP_NUM_THREADS unset."""

    def make(cores: int, busy: float) -> None:
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr("skyfall.devices.busy_cores", lambda sample_s=0.25: busy)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    return make


@pytest.mark.parametrize(
    ("cores", "busy", "threads"),
    [(2, 0.1, 2), (2, 0.9, 1), (2, 3.0, 1), (16, 0.0, 16), (16, 4.2, 12), (16, 40.0, 1), (1, 0.0, 1)],
)
def test_default_uses_the_cores_other_processes_leave_idle(machine, cores: int, busy: float, threads: int):
    machine(cores, busy)
    choice = choose_threads()
    assert choice.threads == threads and choice.cores == cores and choice.busy == busy
    assert f"{cores} cores, {busy:.1f} busy" in choice.describe()


def test_busy_cores_sees_a_spinning_process():
    from skyfall.devices import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert busy_cores(0.5) >= 0.6  # one process spinning keeps about one core busy
    finally:
        spinner.kill()
        spinner.wait()


def test_explicit_choices_win(machine, monkeypatch: pytest.MonkeyPatch):
    machine(2, 0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads().threads == 1 and choose_threads().reason == "OMP_NUM_THREADS"
    assert choose_threads(3).threads == 3 and choose_threads(3).reason == "--threads"
    with pytest.raises(ConfigError, match="--threads must be >= 1"):
        choose_threads(0)
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS"):
        choose_threads()


def test_the_cli_applies_and_reports_the_thread_count(tmp_path):
    code = (
        "import sys, torch; from skyfall.cli import entrypoint; "
        "entrypoint(sys.argv[1:]); print('torch threads', torch.get_num_threads())"
    )
    args = ["synth", str(tmp_path / "t"), "--preset", "tiny", "--threads", "2"]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("[skyfall] 2 CPU threads for torch (--threads;")
    assert lines[-1] == "torch threads 2"

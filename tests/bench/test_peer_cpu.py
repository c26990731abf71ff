"""bench/peer_servers.py's Running.cpu_seconds: the CPU time of a server's whole session
(front, core, workers), read from /proc; what peers.py divides by the output tokens. A
stand-in server whose child process burns the CPU shows it counts the children too."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from peer_servers import Running, Server  # noqa: E402

# A parent that sleeps and a child that spins for `seconds`, then both sleep.
BURNER = textwrap.dedent(
    """
    import multiprocessing, sys, time

    def burn(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass
        time.sleep(60)

    if __name__ == "__main__":
        spawn = multiprocessing.get_context("spawn")
        child = spawn.Process(target=burn, args=(float(sys.argv[1]),))
        child.start()
        print("started", flush=True)
        child.join()
    """
)


class Burner(Server):
    def __init__(self, script: Path, seconds: float) -> None:
        super().__init__("burner")
        self.script, self.seconds = script, seconds

    def command(self, model_dir: Path, port: int, concurrency: int) -> list[str]:
        return [sys.executable, str(self.script), str(self.seconds)]


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux only)")
def test_cpu_seconds_counts_the_children_of_the_servers_session(tmp_path):
    script = tmp_path / "burner.py"
    script.write_text(BURNER)
    running = Running(Burner(script, 0.6), tmp_path, 0, 1, tmp_path / "burner.log")
    try:
        deadline = time.monotonic() + 20
        while running.cpu_seconds() < 0.6:  # the parent sleeps: only the child can reach it
            assert running.proc.poll() is None, running.tail()
            assert time.monotonic() < deadline, f"only {running.cpu_seconds()} s counted"
            time.sleep(0.1)
        settled = running.cpu_seconds()
        time.sleep(0.5)  # both sleep now: nothing more is counted
        assert running.cpu_seconds() - settled < 0.1
    finally:
        running.stop()

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

# A parent that sleeps and a child that spins for argv[1] seconds of CPU, then touches the
# file argv[2] and sleeps.
BURNER = textwrap.dedent(
    """
    import multiprocessing, pathlib, sys, time

    def burn(seconds, done):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass
        pathlib.Path(done).touch()
        time.sleep(60)

    if __name__ == "__main__":
        spawn = multiprocessing.get_context("spawn")
        child = spawn.Process(target=burn, args=(float(sys.argv[1]), sys.argv[2]))
        child.start()
        child.join()
    """
)


class Burner(Server):
    def __init__(self, script: Path, seconds: float, done: Path) -> None:
        super().__init__("burner")
        self.script, self.seconds, self.done = script, seconds, done

    def command(self, model_dir: Path, port: int, concurrency: int) -> list[str]:
        return [sys.executable, str(self.script), str(self.seconds), str(self.done)]


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux only)")
def test_cpu_seconds_counts_the_children_of_the_servers_session(tmp_path):
    script, done = tmp_path / "burner.py", tmp_path / "burnt"
    script.write_text(BURNER)
    running = Running(Burner(script, 0.6, done), tmp_path, 0, 1, tmp_path / "burner.log")
    try:
        deadline = time.monotonic() + 20
        while not done.exists():
            assert running.proc.poll() is None, running.tail()
            assert time.monotonic() < deadline, "the child never finished burning"
            time.sleep(0.05)
        counted = running.cpu_seconds()
        # The parent sleeps in join() (a few 10 ms tick at most): only the child's 0.6 s of
        # CPU can bring the session past 0.55 s (/proc counts whole 10 ms ticks).
        assert counted >= 0.55, counted
        time.sleep(0.5)  # both sleep now: nothing more is counted
        assert running.cpu_seconds() - counted < 0.05
    finally:
        running.stop()

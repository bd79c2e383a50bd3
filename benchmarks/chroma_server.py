"""A real Chroma server process (`chroma run`, from the `chromadb` package in the dev extra), started and
stopped by its caller on a free loopback port, persisting to a folder: the shared gallery of
`trimvlm bench peers`' multi-worker row and of the shared-gallery tests."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from benchmarks.service_bench import free_port, wait_for_200


def chroma_executable() -> str | None:
    here = Path(sys.executable).parent / "chroma"  # the venv's, not whatever is on PATH
    return str(here) if here.exists() else shutil.which("chroma")


class ChromaServer:
    def __init__(self, path: Path, log_path: Path, port: int | None = None):
        self.path, self.log_path, self.port = path, log_path, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> ChromaServer:
        exe = chroma_executable()
        assert exe, "chroma (pip install chromadb) not found"
        with open(self.log_path, "ab") as log:
            cmd = [exe, "run", "--path", str(self.path), "--host", "127.0.0.1", "--port", str(self.port)]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_200(
                self.proc,
                self.url + "/api/v2/heartbeat",
                timeout_s,
                lambda: f"chroma exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}",
                every_s=0.1,
            )
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

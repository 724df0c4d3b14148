"""Running `asif serve` in a subprocess on a free loopback port, for end-to-end and fault tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def build_command(
    pairs: Path, images: Path, out: Path, image_encoder: str, text_encoder: str, *extra: str
) -> list[str]:
    """`asif build` as a subprocess command line."""
    return [
        sys.executable, "-m", "cli", "build", "--pairs", str(pairs), "--images-root", str(images),
        "--out", str(out), "--image-encoder", image_encoder, "--text-encoder", text_encoder, *extra,
    ]  # fmt: skip


def serve_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a served test process: this checkout first on the path, the test encoders allowed."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", ASIF_BATCH_MAX_WAIT_MS="1", ASIF_PLUGIN_ENCODERS="1")
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return full_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m cli serve` on loopback; waits until /readyz answers 200."""

    def __init__(
        self,
        index: Path,
        env: dict[str, str] | None = None,
        ready_timeout: float = 120,
        args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        full_env = serve_env(env)
        # Output goes to a file, not a pipe: an unread pipe fills up and blocks the server's logging.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--index", str(index), "--port", str(self.port), *args],
            env=full_env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("server exited early:\n" + self.output())
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise AssertionError("server did not become ready")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> tuple[int, str]:
        """SIGTERM (graceful: flushes a snapshot); returns (exit code, output)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.http.close()
        return self.proc.returncode, self.output()

    def kill(self) -> str:
        """SIGKILL: no shutdown code runs."""
        self.proc.kill()
        self.proc.wait(timeout=60)
        self.http.close()
        return self.output()

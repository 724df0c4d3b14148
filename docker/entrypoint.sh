#!/usr/bin/env sh
# Container entrypoint.
#   build   run `asif build` on the mounted pairs (skipped when the index exists, unless ASIF_REBUILD=1); with
#           ASIF_STORE=milvus it loads a shared model into Milvus at ASIF_MILVUS_URI instead (same rule)
#   serve   exec `asif serve`: the server is PID 1's child-free process, so SIGTERM reaches uvicorn, which
#           finishes requests and flushes a last snapshot of pending edits before exiting. On a non-loopback
#           ASIF_HOST (the image's 0.0.0.0) without ASIF_API_KEY or ASIF_OPEN_WRITES=1, the key comes from
#           ASIF_API_KEY_FILE (default /models/api-key, the models volume), generated there on first start
#   other   run the given command (e.g. `asif eval ...`, `sh`)
set -eu
cmd="${1:-serve}"
[ "$#" -gt 0 ] && shift
index="${ASIF_INDEX:-/index}"
store="${ASIF_STORE:-faiss}"
# The write key of a server reachable from other machines: ASIF_API_KEY, else the key file, created with a random
# key on first start (mode 600; `ln` is atomic, so replicas that start together over one volume keep one key).
load_api_key() {
    [ -n "${ASIF_API_KEY:-}" ] && return 0
    case "${ASIF_OPEN_WRITES:-}" in 1 | [Tt]rue | TRUE | [Yy]es | YES | [Oo]n | ON) return 0 ;; esac
    case "${ASIF_HOST:-0.0.0.0}" in 127.* | ::1 | "[::1]" | localhost) return 0 ;; esac
    keyfile="${ASIF_API_KEY_FILE:-/models/api-key}"
    if [ ! -s "$keyfile" ]; then
        tmp="$keyfile.$$"
        (umask 077 && python -c "import secrets; print(secrets.token_urlsafe(32))" >"$tmp")
        chmod 600 "$tmp"
        if ln "$tmp" "$keyfile" 2>/dev/null; then
            echo "asif-entrypoint: ASIF_API_KEY is not set: generated a write key in $keyfile (read it there)"
        fi
        rm -f "$tmp"
    fi
    ASIF_API_KEY="$(cat "$keyfile")"
    [ -n "$ASIF_API_KEY" ] || { echo "asif-entrypoint: $keyfile is empty" >&2; exit 2; }
    export ASIF_API_KEY
    echo "asif-entrypoint: write endpoints need the key in $keyfile (Authorization: Bearer <key>)"
}

case "$cmd" in
    build)
        if [ "$store" = "milvus" ]; then  # a shared model in Milvus; built once unless ASIF_REBUILD=1
            flag="--skip-existing"
            [ "${ASIF_REBUILD:-0}" = "1" ] && flag="--force"
            exec asif build --store milvus \
                --milvus-uri "${ASIF_MILVUS_URI:-milvus.db}" \
                --milvus-prefix "${ASIF_MILVUS_PREFIX:-asif}" \
                --milvus-index "${ASIF_MILVUS_INDEX:-FLAT}" \
                --out "${ASIF_BUILD_DIR:-/tmp/asif-build}" \
                --pairs "${ASIF_PAIRS:-/data/pairs.csv}" \
                --images-root "${ASIF_IMAGES_ROOT:-/data/images}" \
                --image-encoder "${ASIF_IMAGE_ENCODER:-effnet-lite2}" \
                --text-encoder "${ASIF_TEXT_ENCODER:-minilm}" \
                --anchors "${ASIF_ANCHORS:-caption}" \
                "$flag" "$@"
        fi
        if [ -f "$index/manifest.json" ] && [ "${ASIF_REBUILD:-0}" != "1" ]; then
            echo "asif-entrypoint: $index already holds an index; not rebuilding (set ASIF_REBUILD=1 to rebuild)"
            exit 0
        fi
        force=""
        [ "${ASIF_REBUILD:-0}" = "1" ] && force="--force"
        # shellcheck disable=SC2086
        exec asif build \
            --pairs "${ASIF_PAIRS:-/data/pairs.csv}" \
            --images-root "${ASIF_IMAGES_ROOT:-/data/images}" \
            --out "$index" \
            --image-encoder "${ASIF_IMAGE_ENCODER:-effnet-lite2}" \
            --text-encoder "${ASIF_TEXT_ENCODER:-minilm}" \
            --index-type "${ASIF_INDEX_TYPE:-auto}" \
            --anchors "${ASIF_ANCHORS:-caption}" \
            $force "$@"
        ;;
    serve)  # ASIF_STORE=milvus: a replica over the shared model (the index folder is not read)
        load_api_key
        exec asif serve --index "$index" --host "${ASIF_HOST:-0.0.0.0}" --port "${ASIF_PORT:-8000}" "$@"
        ;;
    *)
        exec "$cmd" "$@"
        ;;
esac

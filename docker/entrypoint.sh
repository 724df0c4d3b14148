#!/usr/bin/env sh
# Container entrypoint.
#   build   run `asif build` on the mounted pairs (skipped when the index exists, unless ASIF_REBUILD=1); with
#           ASIF_STORE=milvus it loads a shared model into Milvus at ASIF_MILVUS_URI instead (same rule)
#   serve   exec `asif serve`: the server is PID 1's child-free process, so SIGTERM reaches uvicorn, which
#           finishes requests and flushes a last snapshot of pending edits before exiting
#   other   run the given command (e.g. `asif eval ...`, `sh`)
set -eu
cmd="${1:-serve}"
[ "$#" -gt 0 ] && shift
index="${ASIF_INDEX:-/index}"
store="${ASIF_STORE:-faiss}"
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
        exec asif serve --index "$index" --host "${ASIF_HOST:-0.0.0.0}" --port "${ASIF_PORT:-8000}" "$@"
        ;;
    *)
        exec "$cmd" "$@"
        ;;
esac

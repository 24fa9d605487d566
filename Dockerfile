# syntax=docker/dockerfile:1
# robust-distill image for KubeRay: Ray head, teacher and student pods all run it.
#   docker build -t robust-distill:0.1.0 .
# The CUDA major version of the base matches the pinned torch wheel (torch.version.cuda: 13.0), which brings
# its own cuBLAS/cuDNN/NCCL; the nodes need an NVIDIA driver that supports CUDA 13 (>= 580).

# ---- builder: resolve and install the project with the pinned versions into a venv ----
FROM nvidia/cuda:13.0.0-runtime-ubuntu22.04 AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# Distribution packages are not pinned: Ubuntu drops superseded versions from its archive, so a pin would
# break the build after the next security update; the base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY robust/ robust/
COPY cluster/ cluster/
RUN pip install --no-cache-dir -c constraints.txt .

# ---- final: the CUDA runtime, Python, the venv and the recipes; no compiler, no pip cache, no sources ----
FROM nvidia/cuda:13.0.0-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive
# wget: KubeRay's default readiness/liveness probes call it inside the Ray containers.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray
COPY --from=builder /opt/venv /opt/venv
COPY recipes/ /app/recipes/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/ray
WORKDIR /app
USER 1000:1000
CMD ["robust-distill", "--help"]

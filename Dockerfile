# flowserve image. GPU by default; CPU with `--build-arg VARIANT=cpu`.
#   docker build -t flowserve .                         # CUDA runtime, torch CUDA build, onnxruntime-gpu
#   docker build -t flowserve:cpu --build-arg VARIANT=cpu .
# Dependencies are installed by the Makefile's `install` target, the same list `make test` uses.
ARG VARIANT=gpu
ARG CUDA_BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG CPU_BASE=python:3.12-slim-bookworm

# ---- base images per variant ---------------------------------------------------------------
FROM ${CUDA_BASE} AS base-gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv make \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3 /usr/local/bin/python
ENV ORT_EXTRA=gpu VARIANT_TORCH_INDEX=

FROM ${CPU_BASE} AS base-cpu
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
# The default index's torch is the CUDA build (with nvidia-* wheels and Triton, ~3.4 GB); the CPU image takes
# PyTorch's CPU build from its own index.
ENV ORT_EXTRA=cpu VARIANT_TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM base-${VARIANT} AS base

# ---- build: a virtual environment with flowserve and its dependencies ---------------------
FROM base AS build
ARG TORCH_SPEC=torch==2.13.0
# Empty: the variant's index (the CPU build for VARIANT=cpu, the default index for gpu).
ARG TORCH_INDEX=
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY models ./models
COPY service ./service
RUN make install PYTHON=python3 VENV=/opt/venv TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX="${TORCH_INDEX:-$VARIANT_TORCH_INDEX}" \
        ORT_EXTRA="${ORT_EXTRA}" EXTRAS="${ORT_EXTRA}" \
    && rm -rf /root/.cache

# ---- runtime --------------------------------------------------------------------------------
FROM base AS runtime
RUN useradd --create-home --uid 10001 flowserve
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY configs ./configs
COPY model_repository /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLOWSERVE_REPOSITORY=/models \
    FLOWSERVE_HOST=0.0.0.0 \
    FLOWSERVE_PORT=8000
VOLUME ["/models"]
USER flowserve
EXPOSE 8000
# Docker's health is liveness (/v2/health/live), on whatever port FLOWSERVE_PORT gives the server: a container
# that is still loading models is alive, and restarting it would not help. Readiness (/v2/health/ready) is for
# load balancers (Kubernetes' readinessProbe, deploy/k8s); `flowserve health --ready` probes it by hand.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["flowserve", "health"]
ENTRYPOINT ["flowserve", "serve"]

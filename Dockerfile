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
ENV ORT_EXTRA=gpu

FROM ${CPU_BASE} AS base-cpu
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
ENV ORT_EXTRA=cpu

FROM base-${VARIANT} AS base

# ---- build: a virtual environment with flowserve and its dependencies ---------------------
FROM base AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY models ./models
COPY service ./service
RUN make install PYTHON=python3 VENV=/opt/venv TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX="${TORCH_INDEX}" \
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
# Slim images have no curl: probe liveness with Python.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=4).status == 200 else 1)"
ENTRYPOINT ["flowserve", "serve"]

# imgserve images. Targets (docker build --target NAME .):
#   server      (the default, last stage) CPU server: python slim + onnxruntime, no torch
#   server-gpu  CUDA 13 + cuDNN 9 runtime: onnxruntime-gpu, torch for TorchScript models
#   trainer     `python -m training build-repository` into the /models volume
# Every pin comes from pyproject.toml through deploy/requirements.py; dependency layers come
# before the source layers, so editing code rebuilds only the last few layers.
# Build with BuildKit (the default builder since Docker 23; DOCKER_BUILDKIT=1 with older clients):
# it builds only the stages the target needs, where the classic builder would build every stage
# before it, the CUDA one included. There is no `# syntax=` line on purpose: the builder's own
# Dockerfile frontend reads this file, so a build needs no registry beyond the base images.

# ---- requirement lists, from pyproject.toml only (changes when the pins change) ----
FROM python:3.11.14-slim-bookworm AS requirements
WORKDIR /src
COPY pyproject.toml deploy/requirements.py ./
RUN python requirements.py pyproject.toml > server.txt \
 && python requirements.py --extra torchscript --extra gpu --without onnxruntime pyproject.toml \
      > server-gpu.txt \
 && python requirements.py --extra train pyproject.toml > trainer.txt \
 && python requirements.py --extra dev --only grpcio-tools pyproject.toml > proto.txt

# ---- generated protobuf/gRPC code (`make proto`); never taken from the build context ----
FROM python:3.11.14-slim-bookworm AS proto
WORKDIR /src
COPY --from=requirements /src/proto.txt ./
RUN pip install --no-cache-dir --requirement proto.txt
COPY proto/ proto/
COPY wire/__init__.py wire/
RUN python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
      proto/wire/*.proto

# ---- the CPU server's virtual environment ----
FROM python:3.11.14-slim-bookworm AS server-deps
COPY --from=requirements /src/server.txt /tmp/
# pip and setuptools are only needed to install: they stay out of the runtime image.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --requirement /tmp/server.txt \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

# ---- trainer: torch + torchvision; writes the model repository into /models ----
FROM python:3.11.14-slim-bookworm AS trainer
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PATH=/opt/venv/bin:$PATH
COPY --from=requirements /src/trainer.txt /tmp/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --requirement /tmp/trainer.txt
# /models and /data exist and belong to the user, so new named volumes mounted there do too.
RUN useradd --uid 10001 --user-group --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin imgserve \
 && install -d -o 10001 -g 10001 /models /data
WORKDIR /app
COPY --from=proto /src/wire/ wire/
COPY modelrepo/ modelrepo/
COPY training/ training/
USER 10001:10001
VOLUME ["/models", "/data"]
ENTRYPOINT ["python", "-m", "training"]
CMD ["build-repository", "--model-repository", "/models", "--data-dir", "/data", \
     "--checkpoint-dir", "/data/checkpoints"]

# ---- GPU server: NVIDIA's CUDA 13 + cuDNN 9 runtime (what onnxruntime-gpu 1.31.1 and
# torch 2.14.1 from PyPI are built against); Ubuntu 24.04's Python 3.12 ----
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS server-gpu
# Ubuntu's archive drops superseded package versions, so exact apt pins would break the build
# within weeks; the base image tag pins the release instead.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY --from=requirements /src/server-gpu.txt /tmp/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --requirement /tmp/server-gpu.txt
# The grace period (SERVER_GRACE_PERIOD_S) is below `docker stop`'s 10 s before SIGKILL, so that
# the drain ends in time; compose and Kubernetes set a longer one with a longer stop timeout.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PATH=/opt/venv/bin:$PATH \
    SERVER_MODEL_REPOSITORY=/models \
    SERVER_HOST=0.0.0.0 \
    SERVER_HTTP_PORT=8000 \
    SERVER_GRPC_PORT=8001 \
    SERVER_METRICS_PORT=8002 \
    SERVER_LOG_FORMAT=json \
    SERVER_DEVICE=auto \
    SERVER_GRACE_PERIOD_S=8
# /models belongs to the user, as in the trainer image. Docker gives an empty named volume the
# owner of the mount point of each container created on it: the compose stack creates the
# server's container while the trainer has not yet written the `models` volume, so a root-owned
# /models here left the trainer unable to write it (PermissionError on /models/fashion_mnist).
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin imgserve \
 && install -d -o 10001 -g 10001 /models
WORKDIR /app
COPY --from=proto /src/wire/ wire/
COPY modelrepo/ modelrepo/
COPY server/ server/
USER 10001:10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-m", "server.healthcheck", "--timeout", "4"]
CMD ["python", "-m", "server"]

# ---- CPU server (the default target: keep it last) ----
FROM python:3.11.14-slim-bookworm AS server
# The grace period (SERVER_GRACE_PERIOD_S) is below `docker stop`'s 10 s before SIGKILL, so that
# the drain ends in time; compose and Kubernetes set a longer one with a longer stop timeout.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PATH=/opt/venv/bin:$PATH \
    SERVER_MODEL_REPOSITORY=/models \
    SERVER_HOST=0.0.0.0 \
    SERVER_HTTP_PORT=8000 \
    SERVER_GRPC_PORT=8001 \
    SERVER_METRICS_PORT=8002 \
    SERVER_LOG_FORMAT=json \
    SERVER_DEVICE=cpu \
    SERVER_GRACE_PERIOD_S=8
# /models belongs to the user (see server-gpu).
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin imgserve \
 && install -d -o 10001 -g 10001 /models
COPY --from=server-deps /opt/venv /opt/venv
WORKDIR /app
COPY --from=proto /src/wire/ wire/
COPY modelrepo/ modelrepo/
COPY server/ server/
USER 10001:10001
EXPOSE 8000 8001 8002
# A real gRPC health check: grpc.health.v1 Check for "" (SERVING once every model is ready),
# on SERVER_HOST (localhost for 0.0.0.0) and SERVER_GRPC_PORT. With TLS on (SERVER_TLS_CERT) it
# needs SERVER_HEALTHCHECK_TLS_CA, plus SERVER_HEALTHCHECK_TLS_CERT/_KEY under mutual TLS.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-m", "server.healthcheck", "--timeout", "4"]
CMD ["python", "-m", "server"]

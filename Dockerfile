# syntax=docker/dockerfile:1
# One image for the coordinator/API and the trainer (rank pods run the same
# image, so the demo's entrypoint exists on both sides).
#
#   CPU (default):  docker build -t rankwarden:0.1.0 .
#   CUDA:           docker build -t rankwarden:0.1.0-cuda \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The CPU build installs torch's CPU wheel; the CUDA build the CUDA wheel
# (it brings its own CUDA runtime and NCCL; the node needs only the NVIDIA
# driver and device plugin).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index that matches the variant: its layer is cached
# across source changes.
RUN pip install --index-url ${TORCH_INDEX} --extra-index-url https://pypi.org/simple \
        "torch==${TORCH_VERSION}" numpy
COPY pyproject.toml README.md /src/
COPY rankwarden /src/rankwarden
RUN pip install "/src[api,s3,kubernetes]"

FROM ${PYTHON_IMAGE}
# Non-root, fixed ids matching the pods' securityContext (runAsUser 1000).
RUN groupadd --gid 1000 rankwarden && \
    useradd --uid 1000 --gid 1000 --home-dir /home/rankwarden --create-home --shell /usr/sbin/nologin rankwarden
COPY --from=build /opt/venv /opt/venv
COPY demo /app/demo
# The demo's synthetic data set, baked in: rank pods do not see the
# coordinator's volume. The state volume mounts at /state; a new named volume
# takes this ownership.
RUN /opt/venv/bin/python /app/demo/make_dataset.py --out /app/data && mkdir /state && chown 1000:1000 /state
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER 1000:1000
EXPOSE 8000
ENTRYPOINT ["rankwarden"]
# Jobs are described by the templates in demo/templates.json (no allowlist: a
# submitter sets only the params a template names). The API token is
# generated at first start in /state/api-token (mode 0600).
CMD ["serve", "--host=0.0.0.0", "--port=8000", "--state-dir=/state", "--templates=/app/demo/templates.json"]

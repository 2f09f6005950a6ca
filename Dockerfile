# syntax=docker/dockerfile:1
# The GPU image: API and worker both run from it (see docker-compose.yml). Needs the NVIDIA Container
# Toolkit on the host. Build: docker compose build   (or: docker build -t gptoss-tuner:local .)
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# Unsloth 2026.10.9 accepts torch < 2.15; torch and torchvision come from the same CUDA index, since a
# torchvision built for another torch fails at import ("operator torchvision::nms does not exist").
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc and the Python headers: Triton (under Unsloth) compiles small launchers at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential ca-certificates curl git \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv && pip install --upgrade pip setuptools wheel
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" --index-url "${TORCH_INDEX}"
# Every later pip install keeps this torch: Unsloth's dependencies (xformers, torchao) would otherwise
# be free to swap it for another build. A clash then fails the build instead of breaking CUDA.
RUN printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" > /opt/torch-constraints.txt
ENV PIP_CONSTRAINT=/opt/torch-constraints.txt

WORKDIR /srv/gptoss
# The pinned stack in its own layer (transformers 5.17.0, trl 1.15.0, peft, datasets<5, Unsloth,
# bitsandbytes: the `gpu` extra), so a code change does not reinstall it. The CUDA index stays in
# reach for the packages built against one torch (xformers).
COPY pyproject.toml README.md ./
RUN mkdir -p app workers && touch app/__init__.py workers/__init__.py \
    && pip install ".[gpu]" --extra-index-url "${TORCH_INDEX}" \
    && pip uninstall -y gptoss-tuner \
    && rm -rf app workers build *.egg-info

COPY alembic.ini ./
COPY migrations ./migrations
COPY configs ./configs
COPY scripts ./scripts
COPY workers ./workers
COPY app ./app
# Editable: app/db.py finds alembic.ini and migrations/ beside the package, as in a checkout.
RUN pip install --no-deps -e .

# One volume holds everything that must survive a restart: database, uploads, job checkpoints,
# adapters, generated models and the Hugging Face cache (the 20b download).
RUN useradd --create-home --uid "${UID}" gptoss && mkdir -p /data && chown gptoss /data
ENV GPTOSS_DATA_DIR=/data \
    HF_HOME=/data/hf-cache \
    GPTOSS_HOST=0.0.0.0 \
    GPTOSS_PORT=8000
VOLUME ["/data"]
USER gptoss

EXPOSE 8000
# start-period: the first start downloads and loads gpt-oss-20b before the API answers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${GPTOSS_PORT}/healthz" || exit 1
CMD ["uvicorn", "app.main:app_from_env", "--factory", "--host", "0.0.0.0", "--port", "8000"]

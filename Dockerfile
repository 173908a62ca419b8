# syntax=docker/dockerfile:1
# The mcp-fhir sidecar: a small, non-root image. Build: docker build -t mcp-fhir:dev .
# Base images are pinned by tag; pin them by digest too in your release pipeline
# (docker buildx imagetools inspect python:3.11.11-slim-bookworm) so a re-tagged upstream cannot slip in.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mcp_fhir ./mcp_fhir
RUN pip wheel --wheel-dir /wheels ".[postgres,redis]"

FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 mcpfhir \
 && useradd --system --uid 10001 --gid mcpfhir --home-dir /var/lib/mcp-fhir --create-home --shell /usr/sbin/nologin mcpfhir
COPY --from=build /wheels /wheels
RUN pip install --no-index /wheels/*.whl && rm -rf /wheels
# Mount points owned by the runtime user: a fresh named volume takes their ownership (audit; and the compose
# demo's bundle-key and bundle volumes, which its one-shot services share as the same uid).
RUN mkdir -p /var/lib/mcp-fhir/audit /keys /bundles \
 && chown mcpfhir:mcpfhir /var/lib/mcp-fhir/audit /keys /bundles
USER 10001:10001
WORKDIR /var/lib/mcp-fhir
EXPOSE 8765 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8765/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["mcp-fhir"]
CMD ["serve", "--config", "/etc/mcp-fhir/config.yaml"]

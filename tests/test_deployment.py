"""docker/: what can be checked without a Docker engine.

promtool checks the Prometheus config, the alert rules and their unit tests; the
dashboard and rules may only query metrics the service exports; the compose file's
services, ports and environment must agree with the settings and with each other.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, require_service
from tracking_grpc.config import ENV_PREFIX, Settings
from tracking_grpc.observability import metrics

DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "tracking.json"
RULES = DOCKER / "prometheus" / "rules" / "tracking.yml"
DOCKERFILE = DOCKER / "Dockerfile"
METRIC = re.compile(r"\b(tracking_[a-z0-9_]+)\b")


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        require_service(
            "promtool", "apt-get install prometheus (scripts/test_services.sh)"
        )
    return subprocess.run(
        ["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


class UniqueKeyLoader(yaml.SafeLoader):
    """A loader that refuses a mapping with a key twice (compose does too)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = {key for key in keys if keys.count(key) > 1}
        if twice:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate keys {sorted(twice)}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


def compose() -> dict:
    return yaml.load((DOCKER / "compose.yaml").read_text(), Loader=UniqueKeyLoader)


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(
            ("check", "config", "docker/prometheus/prometheus.yml"), id="config"
        ),
        pytest.param(
            ("check", "rules", "docker/prometheus/rules/tracking.yml"), id="rules"
        ),
        pytest.param(
            ("test", "rules", "docker/prometheus/tests/tracking_test.yml"), id="tests"
        ),
    ],
)
def test_promtool_accepts(args):
    done = promtool(*args)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_queries_are_valid_promql(tmp_path):
    exprs = [q.replace("$__rate_interval", "5m") for q in dashboard_queries()]
    rules = [{"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(lambda: "\n".join(dashboard_queries()), id="dashboard"),
        pytest.param(lambda: "\n".join(rule_queries()), id="alert-rules"),
    ],
)
def test_queries_name_only_exported_metrics(source):
    used = set(METRIC.findall(source()))
    assert used, "no tracking_ metric referenced"
    assert used <= metrics.metric_names(), used - metrics.metric_names()


def test_dashboard_covers_every_metric_family():
    used = set(METRIC.findall("\n".join(dashboard_queries())))
    exported = {n for n in metrics.metric_names() if not n.endswith("_created")}
    families = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in exported}
    shown = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
    assert families <= shown, families - shown


def tracking_environment() -> dict[str, str]:
    """The service's environment in the compose file, placeholders filled in."""
    env = compose()["services"]["tracking"]["environment"]
    return {k: re.sub(r"\$\{(\w+)[^}]*\}", r"<\1>", str(v)) for k, v in env.items()}


def test_compose_runs_the_whole_stack():
    services = compose()["services"]
    expected = {
        "tracking",
        "migrate",
        "envoy",
        "postgres",
        "redis",
        "prometheus",
        "grafana",
        "jaeger",
    }
    assert set(services) == expected
    assert services["tracking"]["deploy"]["replicas"] == 2
    migrated = services["tracking"]["depends_on"]["migrate"]["condition"]
    assert migrated == "service_completed_successfully"
    assert services["migrate"]["command"] == ["tracking", "migrate"]
    assert services["postgres"]["image"].startswith("postgis/postgis:")


def test_compose_environment_names_real_settings():
    env = tracking_environment()
    names = {k.removeprefix(ENV_PREFIX).lower() for k in env}
    assert all(k.startswith(ENV_PREFIX) for k in env)
    assert names <= set(Settings.names()), names - set(Settings.names())
    settings = Settings().merged(
        {n: env[ENV_PREFIX + n.upper()] for n in names}, "compose"
    )
    assert settings.database_url.startswith("postgresql://")
    assert settings.redis_url.startswith("redis://redis:")
    assert settings.otlp_endpoint == "http://jaeger:4317"


def test_ports_agree_across_compose_envoy_prometheus_and_dockerfile():
    env = tracking_environment()
    grpc_port = int(env["TRACKING_LISTEN"].rpartition(":")[2])
    metrics_port = int(env["TRACKING_METRICS_LISTEN"].rpartition(":")[2])
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "tracking")
    envoy = (DOCKER / "envoy" / "envoy.yaml").read_text()
    exposed = re.search(r"^EXPOSE (.+)$", DOCKERFILE.read_text(), re.M).group(1).split()
    assert job["dns_sd_configs"][0]["port"] == metrics_port
    assert f"{{address: tracking, port_value: {grpc_port}}}" in envoy
    assert {str(grpc_port), str(metrics_port)} <= set(exposed)
    assert {str(grpc_port), str(metrics_port)} <= set(
        compose()["services"]["tracking"]["expose"]
    )


def test_published_ports_bind_loopback_only():
    for name, service in compose()["services"].items():
        for mapping in service.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), (name, mapping)


def test_mounted_files_exist():
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), (name, source)


def test_dockerfile_runs_unprivileged_with_a_grpc_health_check():
    text = DOCKERFILE.read_text()
    assert text.count("FROM ") >= 2
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "tracking_grpc.observability.probe" in text.split("HEALTHCHECK", 1)[1]
    for name in re.findall(r"\b" + ENV_PREFIX + r"(\w+)=", text):
        assert name.lower() in Settings.names(), name


def test_grafana_datasource_is_the_one_the_dashboard_uses():
    provisioned = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    (source,) = yaml.safe_load(provisioned.read_text())["datasources"]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert {p["datasource"]["uid"] for p in panels} == {source["uid"]}


@pytest.mark.slow
def test_the_wheel_the_image_installs_carries_every_package_file(tmp_path):
    source = tmp_path / "src"  # what the image's build stage copies, and only that
    source.mkdir()
    build_stage = DOCKERFILE.read_text().split("\nFROM ")[1]
    for copied in re.findall(r"^COPY (?!--)(.+) \S+$", build_stage, re.M):
        for path in (ROOT / name.rstrip("/") for name in copied.split()):
            if path.is_dir():
                shutil.copytree(path, source / path.name, ignore=IGNORED)
            else:
                shutil.copy(path, source / path.name)
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
    ]
    done = subprocess.run(
        [*command, "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    files = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "tracking_grpc").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert files <= packed, sorted(files - packed)


IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")

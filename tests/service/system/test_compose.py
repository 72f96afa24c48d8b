"""The compose deployment, without Docker: run the very commands its containers run (the image's entrypoint
with each service's command and environment, as written in docker/docker-compose.yml) on this machine,
against the real PostgreSQL. A broken entrypoint, command or environment variable name fails here.

Only what cannot exist outside containers is mapped: the `db` host becomes the test server, named volumes
become temporary folders, each API replica binds its own port on 127.0.0.1, and the proxy is this machine's
nginx (Debian's) run with docker/nginx.conf, its upstream hosts mapped to those ports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy.engine import make_url

from service.console.local_server import free_port
from service.settings import Settings

REPO = Path(__file__).resolve().parents[3]
COMPOSE = REPO / "docker" / "docker-compose.yml"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
NGINX_CONF = REPO / "docker" / "nginx.conf"
REPLICAS = ("api-1", "api-2")
SECRETS = {"GRACEFUL_API_KEY": "compose-test-key", "POSTGRES_PASSWORD": "unused-with-trust-auth"}
# Variables the entrypoint itself reads (everything else GRACEFUL_* must be a Settings field).
ENTRYPOINT_VARS = {"GRACEFUL_PORT", "GRACEFUL_HOST", "GRACEFUL_API_URL", "GRACEFUL_DEMO_DIR"}


def _interpolate(value: str) -> str:
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        if name in SECRETS:
            return SECRETS[name]
        if default is not None:
            return default
        raise AssertionError(f"compose variable {name} has no value in this test")

    return re.sub(r"\$\{(\w+)(:?[-?]([^}]*))?\}", sub, str(value))


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _service_env(service: dict, volumes: dict[str, Path], pg_url: str) -> dict[str, str]:
    env = {k: _interpolate(v) for k, v in service.get("environment", {}).items()}
    pg = make_url(pg_url)
    for key, value in env.items():
        for mount, folder in volumes.items():
            value = value.replace(mount, str(folder))
        # The db service's host and database, as the test server knows them.
        value = re.sub(r"@db:5432/\w+", f"@{pg.host}:{pg.port}/{pg.database}", value)
        env[key] = value
    return env


def _volumes(service: dict, root: Path) -> dict[str, Path]:
    out = {}
    for spec in service.get("volumes", []):
        name, mount = spec.split(":")[:2]
        out[mount] = root / name
        (root / name).mkdir(parents=True, exist_ok=True)
    return out


def test_compose_env_names_are_real_settings() -> None:
    fields = {f"GRACEFUL_{name.upper()}" for name in Settings.model_fields}
    for name, service in _compose()["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("GRACEFUL_"):
                assert key in fields | ENTRYPOINT_VARS, f"service {name}: unknown setting {key}"
    services = _compose()["services"]
    for name in REPLICAS:
        assert services[name]["depends_on"]["db"]["condition"] == "service_healthy"
    env = [services[n]["environment"] for n in REPLICAS]
    assert env[0] == env[1], "the replicas differ in settings"
    index_vols = [
        [v for v in services[n]["volumes"] if v.endswith(":/var/lib/graceful/index")] for n in REPLICAS
    ]
    assert index_vols[0] != index_vols[1], "the replicas must not share their FAISS snapshots"
    proxy = services["proxy"]
    assert {"api-1", "api-2"} <= set(proxy["depends_on"])
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert all(f"server {n}:8000" in NGINX_CONF.read_text() for n in REPLICAS)
    assert "pg_isready" in " ".join(_compose()["services"]["db"]["healthcheck"]["test"])
    assert "readyz" in (REPO / "docker" / "Dockerfile").read_text()


@pytest.mark.slow
@pytest.mark.postgres
def test_api_and_demo_job_run_as_compose_runs_them(tmp_path: Path) -> None:
    pg_url = os.environ.get("GRACEFUL_TEST_POSTGRES_URL")
    if not pg_url:
        pytest.skip("GRACEFUL_TEST_POSTGRES_URL is not set")
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("the demo job needs Debian's dataset-fashion-mnist")
    from index.db import make_engine
    from index.tables import drop_schema

    engine = make_engine(pg_url)
    drop_schema(engine)
    engine.dispose()

    services = _compose()["services"]
    demo = services["demo"]
    demo_vols = _volumes(demo, tmp_path)
    env_path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    procs: list[subprocess.Popen] = []
    ports: dict[str, int] = {}
    logs = []
    for name in REPLICAS:
        api = services[name]
        vols = _volumes(api, tmp_path)
        assert vols["/var/lib/graceful/models"] == demo_vols["/var/lib/graceful/models"]  # shared volume
        ports[name] = free_port()
        api_env = {
            **os.environ,
            **_service_env(api, vols, pg_url),
            "GRACEFUL_PORT": str(ports[name]),
            "GRACEFUL_HOST": "127.0.0.1",
            "PATH": env_path,
        }
        api_env.pop("GRACEFUL_ACTIVE_MODEL", None)
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed in finally
        logs.append(log)
        procs.append(
            subprocess.Popen(
                ["sh", str(ENTRYPOINT), *api["command"]], env=api_env, stdout=log, stderr=subprocess.STDOUT
            )
        )
    proxy_port = free_port()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        for p in procs:
            p.terminate()
        pytest.skip("nginx is not installed (apt-get install nginx; make test installs it)")
    conf = NGINX_CONF.read_text()
    for name, port in ports.items():
        conf = conf.replace(f"server {name}:8000", f"server 127.0.0.1:{port}")
    run_dir = tmp_path / "nginx"
    run_dir.mkdir(mode=0o777)
    run_dir.chmod(0o777)  # nginx's workers run as nobody when started by root
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{proxy_port};").replace("/tmp/", f"{run_dir}/")
    (run_dir / "nginx.conf").write_text(conf)
    procs.append(
        subprocess.Popen(
            [nginx, "-c", str(run_dir / "nginx.conf"), "-p", str(run_dir), "-g", "daemon off;"],
            stdout=logs[0],
            stderr=subprocess.STDOUT,
        )
    )
    try:
        import time

        url = f"http://127.0.0.1:{proxy_port}"
        for name, port in [*ports.items(), ("proxy", proxy_port)]:
            for _ in range(600):
                assert all(p.poll() is None for p in procs), (tmp_path / "api-1.log").read_text()[-3000:]
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            else:
                raise AssertionError(f"{name} did not come up")
        demo_env = {**os.environ, **_service_env(demo, demo_vols, pg_url), "PATH": env_path}
        demo_env["GRACEFUL_API_URL"] = demo_env["GRACEFUL_API_URL"].replace("http://proxy:8000", url)
        for k in ("GRACEFUL_DATABASE_URL", "GRACEFUL_ACTIVE_MODEL"):
            demo_env.pop(k, None)
        out = subprocess.run(
            ["sh", str(ENTRYPOINT), *demo["command"], "--quick"],
            env=demo_env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "new/old  (v2 queries, v1 gallery)" in out.stdout and "refused with HTTP 409" in out.stdout
        assert (demo_vols["/var/lib/graceful/demo"] / "report.json").exists()
        # The state is in PostgreSQL, and both replicas serve it: the active version is the BCT v2 on each.
        time.sleep(1.0)
        for port in ports.values():
            r = httpx.get(f"http://127.0.0.1:{port}/v1/models/active", timeout=10)
            assert r.status_code == 200 and r.json()["version"] == "v2"
            assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        # The proxy spreads requests over both replicas.
        upstreams = {
            httpx.get(url + "/readyz", timeout=10).headers.get("x-graceful-upstream") for _ in range(20)
        }
        assert upstreams == {f"127.0.0.1:{p}" for p in ports.values()}, upstreams
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        for log in logs:
            log.close()

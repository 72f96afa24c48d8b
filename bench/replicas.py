"""Replicas on one machine: ingest and search through one and two ``graceful serve`` processes on one
database, two behind nginx run with docker/nginx.conf (the compose file's proxy), against the same search
pipeline in-process. Rounds interleaved, medians; clients are threads of this process, on the same cores.

    .venv/bin/python -m bench.replicas --database-url postgresql+psycopg://USER@127.0.0.1:PORT/DB
    .venv/bin/python -m bench.replicas --quick          # smaller, a SQLite file; prints only

The database's gallery tables are dropped first (use a throwaway database: scripts/postgres-for-tests.sh
starts one). Without ``--database-url``, a SQLite file in a temporary folder (replicas on one machine may
share one). Models as bench/service.py: v1 and its BCT child v2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import REPO, command_line, machine_line, v1_v2_models, write_section
from bench.service import KEY, InProcessSearch, ingest_test, inprocess_test, load_test_urls
from service.console.client import GracefulClient
from service.console.local_server import LocalServer, free_port
from service.images import encode_png, encode_png_base64
from trainer.artifact import load_model
from trainer.data import load_split, query_gallery_split

NGINX_CONF = REPO / "docker" / "nginx.conf"


class Proxy:
    """Debian's nginx with docker/nginx.conf, its upstreams mapped to local ports."""

    def __init__(self, ports: list[int], work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = NGINX_CONF.read_text()
        upstream = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n" for p in ports)
        start = conf.index("        server api-1:8000")
        end = conf.index("        keepalive", start)
        conf = conf[:start] + upstream + conf[end:]
        self.dir = work / f"nginx-{self.port}"
        self.dir.mkdir(mode=0o777)
        self.dir.chmod(0o777)  # its workers run as nobody when started by root
        conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{self.port};").replace("/tmp/", f"{self.dir}/")
        (self.dir / "nginx.conf").write_text(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen(
            [nginx, "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import httpx

        for _ in range(100):
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("nginx did not come up")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def reset_database(url: str) -> None:
    from index.db import make_engine
    from index.tables import drop_schema

    engine = make_engine(url)
    try:
        drop_schema(engine)
    finally:
        engine.dispose()


def run(args) -> dict:
    models = Path(args.models).resolve() if args.models else v1_v2_models("replicas", args.quick)
    test = load_split(None, "test")
    q_idx, g_idx = query_gallery_split(len(test))
    if args.quick:
        q_idx, g_idx = q_idx[:200], g_idx[:1000]
    work = Path(tempfile.mkdtemp(prefix="graceful-replicas-"))
    db_url = args.database_url or f"sqlite:///{work / 'gallery.db'}"
    res: dict = {"models": str(models.relative_to(REPO)) if models.is_relative_to(REPO) else str(models)}
    res["database"] = "PostgreSQL" if db_url.startswith("postgresql") else "SQLite"
    res["gallery"], res["queries"] = len(g_idx), len(q_idx)
    ids = [f"t{i}" for i in g_idx]

    def env(name: str) -> dict[str, str]:
        return {
            "GRACEFUL_MODELS_DIR": str(models),
            "GRACEFUL_DATA_DIR": str(work / "data"),
            "GRACEFUL_INDEX_DIR": str(work / f"index-{name}"),
            "GRACEFUL_DATABASE_URL": db_url,
            "GRACEFUL_API_KEY": KEY,
            "GRACEFUL_ACTIVE_MODEL": "v1",
        }

    servers: list[LocalServer] = []
    proxies: list[Proxy] = []
    try:
        # Ingest: one replica, then two behind the proxy, each into an empty gallery.
        ingest: dict[str, list[float]] = {"1 replica": [], "2 replicas, proxy": []}

        def empty() -> None:
            if args.database_url:
                reset_database(db_url)
            else:
                (work / "gallery.db").unlink(missing_ok=True)
            for name in ("data", "index-a", "index-b"):
                shutil.rmtree(work / name, ignore_errors=True)

        for _ in range(args.ingest_rounds):
            empty()
            one = LocalServer(env("a"), work / "a.log").start()
            rate = ingest_test(
                GracefulClient(one.url, KEY), ids, test.images[g_idx], test.labels[g_idx], 256, 4
            )
            ingest["1 replica"].append(rate)
            one.stop()
            empty()
            pair = [LocalServer(env(n), work / f"{n}.log").start() for n in ("a", "b")]
            proxy = Proxy([s.port for s in pair], work)
            rate = ingest_test(
                GracefulClient(proxy.url, KEY), ids, test.images[g_idx], test.labels[g_idx], 256, 4
            )
            ingest["2 replicas, proxy"].append(rate)
            proxy.stop()
            for s in pair:
                s.stop()
            print(f"ingest: {ingest}", flush=True)
        res["ingest"] = {k: statistics.median(v) for k, v in ingest.items()}

        # Search: the gallery of the last round, v2 active (activated through one replica, followed by the other).
        servers = [LocalServer(env(n), work / f"{n}.log").start() for n in ("a", "b")]
        GracefulClient(servers[0].url, KEY).activate(
            "v2", force=args.quick
        )  # 1-epoch quick models fail the check
        time.sleep(1.0)
        for s in servers:
            assert GracefulClient(s.url, KEY).get("/v1/models/active")["version"] == "v2"
        both = Proxy([s.port for s in servers], work)
        only_a = Proxy([servers[0].port], work)
        proxies = [both, only_a]

        from index import Gallery

        v2 = load_model(models / "v2")
        local = Gallery.open(db_url, work / "local-data", index_dir=work / "index-local")
        pipeline = InProcessSearch(local, v2, "v2")
        pngs = [encode_png(test.images[i]) for i in q_idx[:500]]
        bodies = [
            json.dumps({"image_base64": encode_png_base64(test.images[i]), "k": 10}).encode()
            for i in q_idx[:500]
        ]
        n = 200 if args.quick else args.requests
        conc = args.concurrency
        rows: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            rows.setdefault("in-process pipeline", []).append(inprocess_test(pipeline.batched, pngs, conc, n))
            rows.setdefault("1 replica, direct", []).append(load_test_urls([servers[0].url], bodies, conc, n))
            rows.setdefault("1 replica, proxy", []).append(load_test_urls([only_a.url], bodies, conc, n))
            rows.setdefault("2 replicas, proxy", []).append(load_test_urls([both.url], bodies, conc, n))
            rows.setdefault("2 replicas, clients split", []).append(
                load_test_urls([s.url for s in servers], bodies, conc, n)
            )
            print({k: round(v[-1]["qps"], 1) for k, v in rows.items()}, flush=True)
        pipeline.close()
        local.close()
        res["search"] = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
        res["concurrency"], res["requests"], res["rounds"] = conc, n, args.rounds
    finally:
        for p in proxies:
            p.stop()
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    return res


def render(res: dict, args) -> str:
    s, ing = res["search"], res["ingest"]
    base = s["in-process pipeline"]["qps"]
    lines = [
        "## Replicas on one machine",
        "",
        f"Command: {command_line()}",
        "",
        machine_line(),
        f"Models: `{res['models']}` (v1 and its BCT child v2). Database: {res['database']} (one for every "
        "server). Each replica is a `graceful serve` process with default settings and its own index dir; "
        "the proxy is Debian's nginx with `docker/nginx.conf` (the compose file's), its upstreams mapped to "
        "the replicas' ports. Clients are threads of the benchmark process (lean keep-alive connections, "
        "bodies encoded beforehand), on the same 2 cores as the servers.",
        "",
        f"### Search by image, concurrency {res['concurrency']}",
        "",
        f"k=10, metadata on, v2 active (activated through one replica; the other followed), over the "
        f"{res['gallery']:,}-image gallery; medians of {res['rounds']} interleaved rounds of "
        f"{res['requests']} requests. In-process: the same pipeline (decode, micro-batched embed, FAISS, "
        "metadata) on a gallery opened on the same database, threads as clients.",
        "",
        "| what | QPS | vs in-process | p50 / p99 ms | failures |",
        "|---|---|---|---|---|",
    ]
    for k, v in s.items():
        lines.append(
            f"| {k} | {v['qps']:.0f} | **{v['qps'] / base:.2f}** | {v['p50_ms']:.1f} / {v['p99_ms']:.1f} | "
            f"{v.get('failures', 0):.0f} |"
        )
    one, two = s["1 replica, direct"]["qps"], s["2 replicas, proxy"]["qps"]
    lines += [
        "",
        f"2 replicas behind the proxy vs 1 replica direct: **{two / one:.2f}x**; vs the in-process pipeline: "
        f"**{two / base:.2f}** (aim 0.8: {'met' if two / base >= 0.8 else 'missed'}). 1 replica direct vs "
        f"in-process: **{one / base:.2f}**.",
        "",
        "### Ingest over HTTP",
        "",
        f"{res['gallery']:,} images as JSON base64 PNG in requests of 256 from 4 client threads into an empty "
        "gallery (sources kept, acknowledged after the commit); median of "
        f"{args.ingest_rounds} rounds.",
        "",
        "| what | images/s |",
        "|---|---|",
    ]
    for k, v in ing.items():
        lines.append(f"| {k} | {v:.0f} |")
    r = ing["2 replicas, proxy"] / ing["1 replica"]
    best = max(ing.values())
    lines += [
        "",
        f"2 replicas vs 1: **{r:.2f}x**. Best: **{best:.0f} images/s** (aim 1,000: "
        f"{'met' if best >= 1000 else 'missed'}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database-url", help="a throwaway database (its gallery tables are dropped)")
    p.add_argument("--models", help="a folder with v1 and v2 (default: bench/service.py's pair)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ingest-rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="a 1,000-image gallery, 200 requests; prints only")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.ingest_rounds = 1, 1
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        p.error(
            "nginx is not installed: apt-get install nginx (scripts/install-system.sh --tests installs it)"
        )
    res = run(args)
    text = render(res, args)
    print(text)
    if (not args.quick) if args.write is None else args.write:
        write_section("Replicas on one machine", text)
        print("wrote the section to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

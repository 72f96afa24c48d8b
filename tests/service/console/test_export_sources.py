"""`graceful export-sources DIR` and GracefulClient.export_sources: the sampled kept sources land in DIR as
plain files (with manifest.json), a non-empty DIR is refused (exit 2) unless --force, an HTTP error is one
line and exit 1 with nothing written, and an archive's member names can never escape DIR."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from service.console import export as export_cli
from service.console.cli import main as cli_main
from service.console.client import DestinationNotEmpty, GracefulClient
from tests.support.payloads import API_KEY, H, item_payload


@pytest.fixture
def server(make_server, tiny_test, split):
    _, gallery = split
    s = make_server().start()
    r = s.client.post("/v1/items", json={"items": item_payload(tiny_test, gallery[:8])}, headers=H)
    assert r.status_code == 200, r.text
    return s


@pytest.fixture
def via_server(server, monkeypatch):
    """The CLI's client sends through the in-process server."""
    monkeypatch.setattr(
        export_cli, "_client", lambda args: GracefulClient(server.url, API_KEY, http_client=server.client)
    )
    return server


def test_cli_writes_the_sample_into_dir_and_refuses_a_non_empty_one(via_server, tmp_path, capsys) -> None:
    out = tmp_path / "new" / "unlabeled"  # made, parents too
    assert cli_main(["export-sources", str(out), "--sample", "5", "--seed", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("exported 5 files (") and str(out) in captured.out
    assert "export" in captured.err  # the progress bar (in bytes)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 6 and "manifest.json" in files
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 2 and manifest["written"] == 5
    for f in manifest["files"]:
        image = via_server.client.get(f"/v1/items/{quote(f['external_id'], safe='')}/image").content
        assert (out / f["file"]).read_bytes() == image

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert export_cli.export_sources_main([str(out), "--sample", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--force" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched

    # --force writes into it; the same seed gives the same files again
    assert (
        export_cli.export_sources_main([str(out), "--sample", "5", "--seed", "2", "--force", "--no-progress"])
        == 0
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert capsys.readouterr().out.startswith("exported 5 files")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_cli.export_sources_main([str(empty), "--sample", "100", "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 8 and summary["without_source"] == 0 and summary["refused"] == []


def test_cli_http_error_is_one_line_and_writes_nothing(via_server, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert export_cli.export_sources_main([str(out), "--sample", "50001", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 422" in err[0] and "GRACEFUL_EXPORT_MAX_SAMPLE" in err[0]
    assert not out.exists()
    assert export_cli.export_sources_main([str(out), "--sample", "0"]) == 2  # refused before asking
    assert "--sample" in capsys.readouterr().err


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_client_writes_only_plain_names(tmp_path: Path) -> None:
    """A hostile or broken archive: members with folders, "..", absolute paths or a leading dot are refused;
    nothing is written outside DIR."""
    evil = {
        "../escaped.png": b"x",
        "/abs.png": b"x",
        "sub/inner.png": b"x",
        ".hidden": b"x",
        "..": b"x",
        "a\\b.png": b"x",
        "ok.png": b"\x89PNG\r\n\x1a\nok",
        "manifest.json": json.dumps({"seed": 1, "without_source": 2, "missing_from_store": 0}).encode(),
    }
    body = _zip(evil)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/gallery/sources/export"
        assert request.url.params["sample"] == "4" and request.url.params["seed"] == "1"
        return httpx.Response(200, content=body, headers={"content-type": "application/zip"})

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://x")
    client = GracefulClient("http://x", http_client=http, retries=0)
    dest = tmp_path / "a" / "dest"
    summary = client.export_sources(dest, sample=4, seed=1, progress=False)
    assert summary.written == ["ok.png"] and summary.without_source == 2
    assert sorted(summary.refused) == sorted(set(evil) - {"ok.png", "manifest.json"})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "a/dest/manifest.json",
        "a/dest/ok.png",
    ]
    assert "2 skipped without a kept source" in summary.line()
    assert "refused" in summary.line()

    # a file where DIR should be, or a non-empty DIR: refused before anything is asked of the server
    with pytest.raises(DestinationNotEmpty, match="not empty"):
        client.export_sources(dest, sample=4, seed=1, progress=False)
    with pytest.raises(DestinationNotEmpty, match="not a folder"):
        client.export_sources(dest / "ok.png", sample=4, seed=1, progress=False)


def test_client_retries_a_503_from_the_first_byte(tmp_path: Path) -> None:
    body = _zip({"1.png": b"\x89PNG\r\n\x1a\n1", "manifest.json": b"{}"})
    answers = [httpx.Response(503, json={"detail": "busy"}), httpx.Response(200, content=body)]
    http = httpx.Client(transport=httpx.MockTransport(lambda r: answers.pop(0)), base_url="http://x")
    client = GracefulClient("http://x", http_client=http, retries=1)
    client.sleep = lambda s: None
    summary = client.export_sources(tmp_path / "d", sample=1, progress=False)
    assert summary.written == ["1.png"] and summary.bytes == len(body)

"""The page at ``/``, the item image endpoint it shows hits with, the model card it draws the matrix from, and
API docs that need no internet; then the page itself, driven in headless Chromium against a real server.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them) and skips
saying so without them. With ``GRACEFUL_SCREENSHOT=docs/page.png`` it saves its screenshot there (the README's).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.routes.item_images import media_type
from service.images import encode_png
from service.settings import Settings
from tests.support.payloads import item_payload
from trainer.data import Dataset

API_KEY = "page-test-key"
H = {"X-API-Key": API_KEY}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
NO_CHROMIUM = "Chromium is not available: apt-get install chromium chromium-driver (make test installs it)"


def _env(root: Path, models: Path) -> dict[str, str]:
    return {
        "GRACEFUL_MODELS_DIR": str(models),
        "GRACEFUL_DATA_DIR": str(root / "data"),
        "GRACEFUL_DATABASE_URL": f"sqlite:///{root / 'gallery.db'}",
        "GRACEFUL_API_KEY": API_KEY,
        "GRACEFUL_ACTIVE_MODEL": "v1",
        "GRACEFUL_TORCH_THREADS": "1",
        "GRACEFUL_THROUGHPUT_PROBE_IMAGES": "32",
    }


@pytest.fixture(scope="module")
def models_copy(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models (v1, v2 = BCT child of v1, v2-indep), copied: a server may write nothing into them."""
    dst = tmp_path_factory.mktemp("page-models") / "models"
    shutil.copytree(tiny_models, dst)
    return dst


def _app(root: Path, models: Path, **overrides) -> TestClient:
    """A started in-process app (its real lifespan) over ``root``'s data dir and database; the caller exits it."""
    from service.app import create_app

    base = {k.removeprefix("GRACEFUL_").lower(): v for k, v in _env(root, models).items()}
    client = TestClient(create_app(Settings(**{**base, **overrides})))
    client.__enter__()
    return client


@pytest.fixture(scope="module")
def client(
    models_copy: Path, tmp_path_factory: pytest.TempPathFactory, tiny_test: Dataset, split
) -> Iterator[TestClient]:
    """One app for the module's read tests, with 6 gallery items ingested."""
    c = _app(tmp_path_factory.mktemp("page-app"), models_copy)
    try:
        _, gallery = split
        r = c.post("/v1/items", json={"items": item_payload(tiny_test, gallery[:6])}, headers=H)
        assert r.status_code == 200, r.text
        yield c
    finally:
        c.__exit__(None, None, None)


# ---- in process ---------------------------------------------------------------------------------------------


def test_page_and_its_files_are_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<input id="query-file" type="file"' in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert not re.search(r"(src|href)=\"https?://", r.text), "the page must load nothing from outside"
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        r = client.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
    assert client.get("/static/nope.js").status_code == 404
    assert "/" not in client.get("/openapi.json").json()["paths"]  # the page is not part of the API


@pytest.mark.parametrize(
    "page, assets",
    [
        ("/docs", ["/static/swagger/swagger-ui-bundle.js", "/static/swagger/swagger-ui.css"]),
        ("/redoc", ["/static/swagger/redoc.standalone.js"]),
    ],
)
def test_api_docs_need_no_internet(client, page, assets):
    r = client.get(page)
    assert r.status_code == 200, r.text
    assert re.findall(r"https?://[^\s\"'<>]+", r.text) == [], "the docs page must reference no outside URL"
    for asset in assets:
        assert asset in r.text
        got = client.get(asset)
        assert got.status_code == 200 and len(got.content) > 10_000, asset
    assert client.get("/openapi.json").status_code == 200


def test_item_image_is_the_kept_source(client, tiny_test: Dataset, split):
    _, gallery = split
    i = int(gallery[0])
    r = client.get(f"/v1/items/g{i}/image")
    assert r.status_code == 200, r.text
    assert r.content == encode_png(tiny_test.images[i])  # the bytes it was ingested with
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff"
    again = client.get(f"/v1/items/g{i}/image", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""

    r = client.get("/v1/items/no-such-item/image")
    assert r.status_code == 404 and "no-such-item" in r.json()["detail"]


def test_item_without_kept_source_has_no_image(models_copy: Path, tmp_path: Path, tiny_test: Dataset, split):
    """An item ingested while GRACEFUL_KEEP_SOURCES is off has no image (404 saying why), in the same
    gallery where an item ingested with sources kept has one."""
    _, gallery = split
    kept, not_kept = int(gallery[0]), int(gallery[10])
    c = _app(tmp_path, models_copy)
    try:
        assert (
            c.post("/v1/items", json={"items": item_payload(tiny_test, [kept])}, headers=H).status_code == 200
        )
    finally:
        c.__exit__(None, None, None)
    c = _app(tmp_path, models_copy, keep_sources=False)  # the same data dir and database, reopened
    try:
        r = c.post(
            "/v1/items", json={"items": item_payload(tiny_test, [not_kept], prefix="nokeep")}, headers=H
        )
        assert r.status_code == 200, r.text
        assert c.get(f"/v1/items/nokeep{not_kept}").json()["has_source"] is False
        r = c.get(f"/v1/items/nokeep{not_kept}/image")
        assert r.status_code == 404
        assert "no kept source" in r.json()["detail"] and "GRACEFUL_KEEP_SOURCES" in r.json()["detail"]
        assert c.get(f"/v1/items/g{kept}/image").status_code == 200
    finally:
        c.__exit__(None, None, None)


def test_model_card_shows_public_keys_and_the_matrix(client):
    c = client
    r = c.get("/v1/models/v2/card")
    assert r.status_code == 200, r.text
    card = r.json()
    assert card["version"] == "v2" and card["compatible_with"] == "v1" and card["space"] == "v1"
    assert set(card) <= {
        "format",
        "version",
        "arch",
        "embedding_dim",
        "classes",
        "space",
        "compatible_with",
        "adapter_of",
        "preprocess",
        "metrics",
    }
    assert "train_config" not in card  # it holds local paths
    cell = card["metrics"]["matrix"]["v2/v1"]
    assert {"top1", "top5", "mAP"} <= set(cell)
    r = c.get("/v1/models/nope/card")
    assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_media_type_by_magic_bytes():
    assert media_type(b"\x89PNG\r\n\x1a\n....") == "image/png"
    assert media_type(b"\xff\xd8\xff\xe0....") == "image/jpeg"
    assert media_type(b"RIFF\x10\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert media_type(b"<html><script>") == "application/octet-stream"
    assert media_type(b"") == "application/octet-stream"


# ---- in a browser ---------------------------------------------------------------------------------------------


def _chrome(profile: Path):
    """Headless Chromium through Debian's chromedriver, or a skip saying what to install."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(NO_CHROMIUM)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1250",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait(what: str, condition: Callable[[], object], timeout: float = 60.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = condition()
        except Exception:  # noqa: BLE001 - an element not there yet
            got = None
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


_LOADED_HITS = """
const imgs = [...document.querySelectorAll('#hits img')];
return imgs.map(i => ({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth}));
"""


@pytest.mark.slow
@pytest.mark.browser
def test_page_in_a_browser(tiny_models: Path, tiny_test: Dataset, split, tmp_path: Path):
    """Search by uploading a file and see the hits' thumbnails load; an API error shows on the page; with the
    key, activate v2 and see the next search answered by v2; start a backfill and watch it finish, with its
    quality curve drawn."""
    from selenium.webdriver.common.by import By

    from service.console.local_server import LocalServer

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    server = LocalServer(_env(tmp_path, models), tmp_path / "server.log")
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path))
    driver = _chrome(profile)
    try:
        server.start()
        queries, gallery = split
        stored = {f"g{i}" for i in gallery[:40]}
        r = httpx.post(
            server.url + "/v1/items",
            json={"items": item_payload(tiny_test, gallery[:40])},
            headers=H,
            timeout=60,
        )
        assert r.status_code == 200, r.text

        driver.get(server.url + "/")
        find = driver.find_element
        _wait("the active version", lambda: find(By.ID, "active-version").text == "v1")
        _wait(
            "the models table",
            lambda: len(driver.find_elements(By.CSS_SELECTOR, "#models-table tbody tr")) == 3,
        )

        # Upload a query image file: the hits are thumbnails of the item image endpoint, and they loaded.
        query = tmp_path / "query.png"
        query.write_bytes(encode_png(tiny_test.images[int(queries[0])]))
        find(By.ID, "query-file").send_keys(str(query))
        _wait("the answering version", lambda: find(By.ID, "query-version").text == "v1")
        hits = _wait(
            "8 loaded thumbnails",
            lambda: (
                (h := driver.execute_script(_LOADED_HITS))
                and len(h) == 8
                and all(x["complete"] for x in h)
                and h
            ),
        )
        for h in hits:
            m = re.fullmatch(r"/v1/items/([^/]+)/image", h["src"])
            assert m and m.group(1) in stored, h
            assert h["width"] == 28, h  # the image decoded: the ingested 28x28 PNG
        assert "embedded by v1" in find(By.ID, "hits").text

        # Without the key, activation is refused and the API's error shows on the page.
        find(By.CSS_SELECTOR, "button[data-activate='v2']").click()
        _wait("the error text", lambda: "401" in find(By.ID, "error").text)
        assert "API key" in find(By.ID, "error").text
        assert find(By.ID, "active-version").text == "v1"

        # With the key: activate v2, and a new search is answered by v2 (over the v1 gallery). The tiny v2 may
        # measure worse than v1 on this gallery: the check's refusal shows, and "force" overrides it.
        find(By.ID, "api-key").send_keys(API_KEY)
        # The check of v2 against the gallery, as activation will measure it, shown on the page.
        find(By.CSS_SELECTOR, "button[data-check='v2']").click()
        _wait("the check of v2", lambda: "v2: " in find(By.ID, "check-result").text)
        assert "overlap@10" in find(By.ID, "check-result").text
        find(By.CSS_SELECTOR, "button[data-activate='v2']").click()
        _wait(
            "v2 active or refused",
            lambda: find(By.ID, "active-version").text == "v2" or "409" in find(By.ID, "error").text,
        )
        if find(By.ID, "active-version").text != "v2":
            assert "force" in find(By.ID, "error").text
            find(By.ID, "force").click()
            find(By.CSS_SELECTOR, "button[data-activate='v2']").click()
            _wait("v2 active", lambda: find(By.ID, "active-version").text == "v2")
            assert "forced" in find(By.ID, "models-info").text
        assert not find(By.ID, "error").is_displayed()
        find(By.ID, "search-again").click()
        _wait("the answer of v2", lambda: find(By.ID, "query-version").text == "v2")
        assert "embedded by v1" in find(By.ID, "hits").text  # nothing was re-embedded
        _wait(
            "v2's compatibility matrix",
            lambda: (
                find(By.ID, "matrix-version").text == "v2"
                and "v2" in find(By.CSS_SELECTOR, "#matrix-table table").text
            ),
        )

        # What a backfill with v2 would buy: the report's quality curve, drawn (the README's screenshot).
        find(By.CSS_SELECTOR, "#candidate option[value='v2']").click()
        find(By.ID, "report").click()
        _wait(
            "the quality curve",
            lambda: driver.find_elements(By.CSS_SELECTOR, "#curve svg polyline"),
            timeout=120,
        )
        assert "items to re-embed with v2" in find(By.ID, "curve-info").text
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        target = os.environ.get("GRACEFUL_SCREENSHOT")
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, target)

        # Start it: its progress is watched to the end, and then the hits are embedded by v2.
        find(By.ID, "start-backfill").click()
        _wait(
            "the backfill to finish",
            lambda: re.search(r": done\b.*\b40/40\b", find(By.ID, "backfill-info").text),
            timeout=120,
        )
        find(By.ID, "search-again").click()
        _wait("hits embedded by v2", lambda: "embedded by v2" in find(By.ID, "hits").text)
        assert not find(By.ID, "error").is_displayed(), find(By.ID, "error").text

        problems = [
            e["message"]
            for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "/activate - " not in e["message"]
        ]  # the refused activations above
        assert problems == [], problems  # no script error, no CSP violation, no failed load
    except BaseException:
        try:  # what the page showed and logged, and the server's log
            print(driver.find_element(By.TAG_NAME, "body").text, driver.get_log("browser"), sep="\n")
            driver.save_screenshot(str(tmp_path / "failed.png"))
        finally:
            print(server.tail())
        raise
    finally:
        driver.quit()
        server.stop()

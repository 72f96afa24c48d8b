"""Metadata that a JSON response could not carry is refused at ingest, with nothing stored.

Before: a lone surrogate (``json.loads('"\\\\udfff"')``) or nesting past Python's recursion limit was
stored, and then every read of the item failed (a 500 at the HTTP door)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from index import Gallery, InvalidInput, NewItem
from index.validation import METADATA_MAX_BYTES, METADATA_MAX_DEPTH

LONE = json.loads('"\\udfff"')  # what a JSON body with the escape "\udfff" decodes to
V = np.ones(16, dtype=np.float32)


def nested(depth: int) -> Any:
    """``depth`` levels of containers (dicts and lists alternating) around a string."""
    x: Any = "leaf"
    for i in range(depth):
        x = {"k": x} if i % 2 else [x]
    return x


def sized(n: int) -> dict[str, str]:
    """Metadata of exactly ``n`` bytes as compact UTF-8 JSON (2-byte characters included)."""
    head = '{"s":"'
    body = "é" * ((n - len(head) - 2) // 2)
    meta = {"s": body + "x" * (n - len(head) - 2 - 2 * len(body))}
    assert len(json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()) == n
    return meta


def _cyclic() -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["self"] = d
    return d


REFUSED: list[tuple[str, Any, str]] = [
    ("lone surrogate value", {"name": LONE}, "lone surrogate"),
    ("lone surrogate key", {LONE: 1}, "lone surrogate"),
    ("lone surrogate deep in a list", {"a": [1, {"b": ["ok", "x" + LONE]}]}, "lone surrogate"),
    ("high surrogate", ["\ud800"], "lone surrogate"),
    ("one level too deep", nested(METADATA_MAX_DEPTH + 1), f"deeper than {METADATA_MAX_DEPTH}"),
    ("past the recursion limit", nested(5000), f"deeper than {METADATA_MAX_DEPTH}"),
    ("contains itself", _cyclic(), f"deeper than {METADATA_MAX_DEPTH}"),
    ("one byte too large", sized(METADATA_MAX_BYTES + 1), "too large"),
    ("huge list", list(range(100_000)), "too large"),
]


@pytest.mark.parametrize("upsert", [False, True], ids=["add", "upsert"])
@pytest.mark.parametrize(("meta", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_and_nothing_of_the_batch_stored(
    gallery: Gallery, meta: Any, message: str, upsert: bool
) -> None:
    gallery.add([NewItem("old", V, metadata={"v": 1})], "v1")
    write = gallery.upsert if upsert else gallery.add
    batch = [NewItem("good", V, metadata={"fine": True}), NewItem("bad", V, metadata=meta)]
    if upsert:
        batch.append(NewItem("old", -V, metadata={"v": 2}))
    with pytest.raises(InvalidInput, match=message) as exc:
        write(batch, "v1")
    assert "'bad'" in str(exc.value)
    str(exc.value).encode("utf-8")  # the message itself can travel in a response
    assert gallery.count() == 1 and gallery.consistency("v1") == (1, 1)
    assert set(gallery.get_items(["good", "bad", "old"])) == {"old"}
    assert gallery.get_metadata(["old"]) == {"old": {"v": 1}}
    assert gallery.search("v1", V, 1)[0][0].score == pytest.approx(1.0)  # "old" kept its vector


@pytest.mark.parametrize(
    "meta",
    [
        nested(METADATA_MAX_DEPTH),
        sized(METADATA_MAX_BYTES),
        {"emoji": "😀", "json pair": json.loads('"\\ud83d\\ude00"')},
        {"n": None, "x": [1.5, True, {"": []}]},
    ],
    ids=["deepest allowed", "largest allowed", "astral characters", "plain"],
)
def test_metadata_within_bounds_is_stored_and_read_back_as_utf8_json(gallery: Gallery, meta: Any) -> None:
    gallery.add([NewItem("a", V, metadata=meta)], "v1")
    (stored,) = gallery.get_metadata(["a"]).values()
    assert stored == meta
    json.dumps(stored, ensure_ascii=False).encode("utf-8")  # what a response does with it


def test_ids_and_source_uris_with_a_lone_surrogate_are_refused(gallery: Gallery) -> None:
    with pytest.raises(InvalidInput, match="external id .* lone surrogate"):
        gallery.add([NewItem("a" + LONE, V)], "v1")
    with pytest.raises(InvalidInput, match="source_uri .* lone surrogate"):
        gallery.add([NewItem("a", V, source_uri="file:///" + LONE)], "v1")
    for lookup in (lambda: gallery.get_items([LONE]), lambda: gallery.delete([LONE])):
        with pytest.raises(InvalidInput, match="lone surrogate"):
            lookup()
    assert gallery.count() == 0

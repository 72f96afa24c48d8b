"""Text with a NUL character is refused with InvalidInput on every backend (PostgreSQL cannot hold it, so
it would surface as a driver error, i.e. a 500 at the HTTP door; found by fuzzing the API)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index import Gallery, NewItem, VersionInfo
from index.errors import InvalidInput


def test_nul_text_is_invalid_input_for_writes_and_lookups(database_url: str, tmp_path: Path) -> None:
    with Gallery.open(database_url, tmp_path / "d") as g:
        g.register_version(VersionInfo("v", space="v", embedding_dim=4))
        g.add([NewItem("ok", np.ones(4))], "v")
        with pytest.raises(InvalidInput, match="NUL"):
            g.add([NewItem("a\x00b", np.ones(4))], "v")
        with pytest.raises(InvalidInput, match="NUL"):
            g.add([NewItem("m", np.ones(4), metadata={"k": ["x\x00"]})], "v")
        for lookup in (
            lambda: g.get_items(["a\x00"]),
            lambda: g.get_embedding("a\x00", "v"),
            lambda: g.get_version("v\x00"),
            lambda: g.delete(["a\x00"]),
        ):
            with pytest.raises(InvalidInput, match="NUL"):
                lookup()
        # a literal backslash-u0000 is ordinary text
        g.add([NewItem("m", np.ones(4), metadata={"k": "\\u0000"})], "v")
        assert g.get_metadata(["m"]) == {"m": {"k": "\\u0000"}}
        assert g.count() == 2

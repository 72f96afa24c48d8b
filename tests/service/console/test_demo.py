"""`graceful demo` checks its arguments before doing anything."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("argv", [["--queries", "-3"], ["--epochs-new", "0"], ["--epochs-old", "x"]])
def test_demo_refuses_bad_counts_before_doing_anything(argv, tmp_path, capsys):
    from service.console.demo import demo_main

    with pytest.raises(SystemExit) as e:
        demo_main(["--workdir", str(tmp_path / "demo"), *argv])
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()

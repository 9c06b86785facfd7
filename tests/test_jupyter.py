"""The IPython extension (``%load_ext diagql``: ``%diagql`` and ``%%diagql``) and the HTML a
Result shows in a notebook: thumbnails of ranked inputs, heat maps of a conv map's means."""
from __future__ import annotations

import base64
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import diagql

IPython = pytest.importorskip("IPython")


@pytest.fixture(scope="module")
def shell(cnn, digits, tmp_path_factory):
    from IPython.testing.globalipapp import get_ipython

    ip = get_ipython()
    ip.run_line_magic("load_ext", "diagql")
    ip.user_ns["db"] = diagql.connect(cnn, digits, progress=False,
                                      cache_dir=tmp_path_factory.mktemp("jupyter-cache"))
    yield ip
    for name in ("db", "other"):
        ip.user_ns.pop(name, None)


def test_import_diagql_stays_light():
    """%load_ext imports diagql and asks for its load_ipython_extension: neither loads torch."""
    code = ("import sys, diagql; assert callable(diagql.load_ipython_extension); "
            "print(sorted(m for m in ('torch', 'IPython', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_line_magic_finds_the_only_connection(shell, cnn, digits):
    result = shell.run_line_magic("diagql", "TOPK 3 INPUTS FOR 6[4]")
    with torch.no_grad():
        seen = []
        handle = cnn[6].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        cnn.eval()(digits[0])
        handle.remove()
    values = seen[0][:, 4].double().numpy()
    expected = np.lexsort((np.arange(len(values)), -values))[:3]
    np.testing.assert_array_equal(result.items, expected)


def test_cell_magic_runs_a_script_and_returns_the_last(shell, capsys):
    result = shell.run_cell_magic("diagql", "db", "SET seed = 1;\nAVG CHANNELS IN 2;")
    assert result.kind == "avg" and len(result.values) == 8
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="unknown layer '9'"):  # the cell fails, no traceback
        shell.run_cell_magic("diagql", "", "TOPK 2 INPUTS FOR 9[0]")
    failed = shell.run_cell("%%diagql db\nTOPK 2 INPUTS FOR 9[0]")
    assert not failed.success


def test_several_connections_must_be_named(shell):
    from IPython.core.error import UsageError

    shell.user_ns["other"] = diagql.Connection.detached(cache_dir=False)
    try:
        with pytest.raises(UsageError, match="several DiagQL connections.*db, other"):
            shell.run_line_magic("diagql", "SHOW SETTINGS")
        assert shell.run_line_magic("diagql", "other SHOW SETTINGS").kind == "table"
    finally:
        del shell.user_ns["other"]


def _pngs(page: str) -> list[tuple[int, int]]:
    """(width, height) of every inline PNG, decoded from its header (and its data inflated)."""
    sizes = []
    for data in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page):
        raw = base64.b64decode(data)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
        idat = raw.index(b"IDAT")
        length = int.from_bytes(raw[idat - 4:idat], "big")
        channels = 3 if raw[25] == 2 else 1
        assert len(zlib.decompress(raw[idat + 4:idat + 4 + length])) == height * (1 + width *
                                                                                  channels)
        sizes.append((width, height))
    return sizes


def test_html_has_thumbnails_and_heat_maps(shell):
    ranked = shell.run_line_magic("diagql", "TOPK 4 INPUTS FOR 6[1]")
    page = ranked._repr_html_()
    assert _pngs(page) == [(8, 8)] * 4  # the 8×8 digits, shown larger by the browser
    assert f"item {ranked.items[0]}" in page
    means = shell.run_line_magic("diagql", "AVG NEURONS IN 2")  # an 8×6×6 conv map
    assert _pngs(means._repr_html_()) == [(6, 6)] * 8


def test_ipython_in_a_terminal_shows_a_result_as_its_table(shell):
    """IPython's plain-text display (a terminal) had shown the repr, <Result topk ...>
    (sweep MM2); it shows the table print() shows."""
    from IPython.lib.pretty import pretty

    result = shell.user_ns["db"].query("TOPK 3 NEURONS IN 6")
    assert pretty(result) == str(result) and "6[" in pretty(result)
    assert not pretty(result).startswith("<Result")

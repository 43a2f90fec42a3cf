"""A screen's run page, results table and plots as the Prefect UI shows them, in headless
Chromium against a real `prefect server` (the code that makes the README's picture)."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image, ImageStat

from atomforge.flows.ui.screenshot import screenshot_screen

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium"),
]
NAMES = ("C2H6", "C6H6", "CH4", "CO2", "H2O", "NH3")


def _looks_drawn(path) -> bool:
    """Return whether the PNG at ``path`` is a real picture: many colours, not one flat."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        return len(colours) > 100 and min(ImageStat.Stat(rgb).stddev) > 10


def test_screen_run_page_table_and_plots_render_in_headless_chromium(tmp_path):
    out = tmp_path / "screen-run.png"
    run, table, plots = screenshot_screen(out, tmp_path / "work")
    assert "screen xtb optimize: molecules" in run.dom and "Artifacts" in run.dom
    assert "Can't connect" not in run.dom + table.dom + plots.dom
    assert all(name in table.dom for name in NAMES) and "energy_per_atom_eV" in table.dom
    assert "data:image/png;base64," in plots.dom and "ranking.png" in plots.dom
    for page in (run, table, plots):
        assert _looks_drawn(page.png), page.url
    with Image.open(out) as picture:
        assert picture.width == 1400 and picture.height == 860 + 560 + 760
    assert _looks_drawn(out)

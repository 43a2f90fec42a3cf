"""Screenshots of a screen's run in the Prefect UI, taken by headless Chromium.

``python -m atomforge.flows.ui.screenshot`` starts a `prefect server` of its own in a
temporary folder, screens ``examples/molecules`` with xtb against it, and writes the run's
page, its results table and its plots, one above the other, to ``docs/screen-run.png`` (the
README's picture); ``--out`` writes it elsewhere. Needs Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "docs" / "screen-run.png"
DEFAULT_SOURCE = REPO / "examples" / "molecules"
WIDTH = 1400
"""Browser window width of each screenshot (its height is the page's own)."""
VIRTUAL_TIME_MS = 30000
"""Virtual time Chromium gives a page to load and render before it is captured."""
SCREEN_SCRIPT = """
import asyncio, sys
from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.screen import screen

report = asyncio.run(screen(StructureSource(path=sys.argv[1]), make_parameters("xtb")))
print(report.flow_run_id)
"""


@dataclass(frozen=True)
class Page:
    """A captured page: its address, its screenshot, and the text of its rendered DOM."""

    url: str
    png: Path
    dom: str


def _free_port() -> int:
    """Return a TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def prefect_server(folder: Path) -> Iterator[dict[str, str]]:
    """Run `prefect server start` on a free loopback port with its home in ``folder``;
    yield the environment of its clients (with an atomforge home in ``folder`` too);
    stop the server's process group on exit."""
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = os.environ | {
        "PREFECT_HOME": str(folder / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "ATOMFORGE_HOME": str(folder / "atomforge"),
        "ATOMFORGE_LOCAL_SERVER": "false",
    }
    env.pop("PREFECT_API_KEY", None)
    folder.mkdir(parents=True, exist_ok=True)
    prefect = str(Path(sys.executable).with_name("prefect"))
    port = api.rsplit(":", 1)[1].split("/")[0]
    with (folder / "server.log").open("w") as log:
        server = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", port],
            env=env | {"PREFECT_API_URL": ""},
            cwd=folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(api, server, folder / "server.log")
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def _wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Return once the API at ``api`` answers its health check (RuntimeError after
    ``timeout`` seconds or if the server exits)."""
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server did not start: {log.read_text()[-2000:]}")


def run_screen(env: dict[str, str], source: Path) -> str:
    """Screen ``source`` with xtb in a process of its own against ``env``'s API; return
    the flow run id."""
    done = subprocess.run(
        [sys.executable, "-c", SCREEN_SCRIPT, str(source)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return done.stdout.split()[-1]


def artifact_ids(env: dict[str, str], flow_run_id: str) -> dict[str, str]:
    """Return the ids of a flow run's keyed artifacts, by key."""
    response = httpx.post(
        f"{env['PREFECT_API_URL']}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}},
        timeout=10,
    )
    response.raise_for_status()
    return {a["key"]: a["id"] for a in response.json() if a.get("key")}


def capture(url: str, png: Path, height: int) -> Page:
    """Load ``url`` in headless Chromium, ``height`` pixels high, and return it captured:
    a screenshot written to ``png`` and the text of the rendered DOM."""
    common = [
        "chromium",
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={WIDTH},{height}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
    ]
    shot = [*common, f"--screenshot={png}", url]
    subprocess.run(shot, capture_output=True, timeout=180, check=True)
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True
    )
    return Page(url, png, dom.stdout)


def stack(pngs: list[Path], out: Path) -> Path:
    """Write the images ``pngs`` one above the other to ``out`` (in 256 colours, which
    keep a screenshot's text sharp at a third of the size); return it."""
    from PIL import Image

    images = [Image.open(path).convert("RGB") for path in pngs]
    width = max(image.width for image in images)
    picture = Image.new("RGB", (width, sum(image.height for image in images)), "white")
    top = 0
    for image in images:
        picture.paste(image, (0, top))
        top += image.height
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.quantize(256).save(out, format="PNG", optimize=True)
    return out


def screenshot_screen(out: Path, folder: Path, source: Path = DEFAULT_SOURCE) -> list[Page]:
    """Screen ``source`` against a new server in ``folder``, capture the run's page, its
    results table and its plots, and write them, stacked, to ``out``; return the pages
    captured."""
    with prefect_server(folder) as env:
        flow_run_id = run_screen(env, source)
        ids = artifact_ids(env, flow_run_id)
        ui = env["PREFECT_API_URL"].removesuffix("/api")
        pages = [
            capture(f"{ui}/runs/flow-run/{flow_run_id}", folder / "run.png", 860),
            capture(f"{ui}/artifacts/artifact/{ids['screen-table']}", folder / "table.png", 560),
            capture(f"{ui}/artifacts/artifact/{ids['screen-plots']}", folder / "plots.png", 760),
        ]
    stack([page.png for page in pages], out)
    return pages


def main(argv: list[str] | None = None) -> int:
    """Regenerate the README's screenshot; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m atomforge.flows.ui.screenshot")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG file to write")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="what to screen")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="atomforge-screenshot-") as folder:
        pages = screenshot_screen(args.out, Path(folder), args.source)
    print(json.dumps({"out": str(args.out), "pages": [page.url for page in pages]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

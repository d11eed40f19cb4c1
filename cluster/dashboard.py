"""The Ray dashboard as a user sees it: its token, its Serve API, and screenshots taken by a real
browser (Debian's headless chromium, driven by Playwright) that enters the token in the dashboard's
own dialog. `ponder screenshots` is the command; the e2e tests call the same functions."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import httpx

TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # where a local Ray keeps it; `ray get-auth-token` prints it
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
# The Prometheus view: what the Grafana dashboard's first panel plots (Ray's own Metrics page needs
# Grafana, which Debian does not package).
PROMETHEUS_QUERY = "sum by (tier, exit_reason) (rate(ray_ponder_requests_total[1m]))"


class DashboardError(RuntimeError):
    """The dashboard, its token or the browser is missing or refused us; the message says which."""


def auth_token() -> str | None:
    """Ray's token as a user finds it: $RAY_AUTH_TOKEN, else the local cluster's token file."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    return TOKEN_FILE.read_text().strip() if TOKEN_FILE.is_file() else None


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def auth_mode(url: str) -> str:
    """`token` or `disabled` (a public endpoint of the dashboard)."""
    try:
        r = httpx.get(f"{url}/api/authentication_mode", timeout=10)
    except httpx.TransportError as exc:
        raise DashboardError(f"no Ray dashboard at {url}: {exc}") from exc
    return r.json().get("authentication_mode", "disabled") if r.status_code == 200 else "disabled"


def serve_applications(url: str, token: str | None) -> dict:
    """The dashboard's Serve API (what its Serve page shows): applications and their deployments."""
    r = httpx.get(f"{url}/api/serve/applications/", headers=_headers(token), timeout=30)
    if r.status_code in (401, 403):
        raise DashboardError(f"the dashboard refused the token ({r.status_code}): see `ray get-auth-token`")
    r.raise_for_status()
    return r.json()


@dataclass(frozen=True)
class Page:
    name: str  # the file is ray-dashboard-<name>.png
    route: str  # the dashboard's hash route
    shows: tuple[str, ...]  # text that must be on the page before it is taken


PAGES = (
    Page("serve", "#/serve", ("Router", "ReasoningWorker", "HEALTHY")),
    Page("actors", "#/actors", ("DepthControl", "ShardActor", "ALIVE")),
    Page("metrics", "#/metrics", ("Grafana",)),
)


def chromium() -> str:
    for name in CHROMIUM:
        if found := shutil.which(name):
            return found
    raise DashboardError("no chromium found: `apt-get install chromium` (scripts/system-deps.sh does)")


def screenshots(
    url: str,
    out: Path,
    token: str | None,
    prometheus: str | None = None,
    progress: Callable[[str], None] = print,
) -> list[Path]:
    """Opens the dashboard, enters the token in its dialog when it asks, screenshots each page once
    the page shows what it should (and Prometheus's graph of Ponder's requests when given)."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    taken: list[Path] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            if auth_mode(url) == "token":
                if not token:
                    raise DashboardError("the dashboard asks for Ray's token: set RAY_AUTH_TOKEN")
                page.get_by_role("textbox", name="Authentication Token").fill(token)
                page.get_by_role("button", name="Submit").click()
                page.get_by_role("dialog").wait_for(state="hidden", timeout=30_000)
            for spec in PAGES:
                page.goto(f"{url}/{spec.route}")
                for text in spec.shows:
                    page.get_by_text(text).first.wait_for(timeout=60_000)
                taken.append(_shot(page, out / f"ray-dashboard-{spec.name}.png", progress))
            if prometheus:
                query = urlencode({"g0.expr": PROMETHEUS_QUERY, "g0.tab": "0", "g0.range_input": "5m"})
                page.goto(f"{prometheus}/graph?{query}")
                page.locator("canvas, .graph-chart, svg").first.wait_for(timeout=60_000)
                taken.append(_shot(page, out / "prometheus-ponder-requests.png", progress))
        except PlaywrightError as exc:
            raise DashboardError(f"the browser could not take the dashboard's pages: {exc}") from exc
        finally:
            browser.close()
    return taken


def _shot(page, path: Path, progress: Callable[[str], None]) -> Path:
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(path), full_page=True)
    progress(f"wrote {path}")
    return path

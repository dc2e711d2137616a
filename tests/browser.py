"""A real headless browser for the dashboard's tests: Chromium from the OS packages, driven by
Selenium through the chromedriver of the same package (its version always matches)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# Screenshots land here (one folder per test file), kept after the run for a person to look at.
OUTPUT = Path(os.environ.get("MLXDIST_TEST_OUTPUT", Path(__file__).parent.parent / "test-output"))
# As root Chromium needs --no-sandbox; the rest keeps it from reaching for Google's services,
# which a closed network refuses, many connections at a time.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--metrics-recording-only",
)


# Debian's and other Linuxes' names, then a Mac's applications (Homebrew's casks put them there)
BROWSERS = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "/Applications/Chromium.app/Contents/MacOS/Chromium",
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
)


def _programs() -> tuple[str, str]:
    chromium = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        raise RuntimeError(
            "the dashboard's tests need Chromium and chromedriver: `make install` installs "
            "Debian's (chromium, chromium-driver); on a Mac, brew install --cask chromium "
            "chromedriver"
        )
    return chromium, driver


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator:
    """A headless Chromium with a fresh profile; its console and network logs are kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _programs()
    profile = tempfile.mkdtemp(prefix="mlxdist-chromium-")
    options = Options()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shot(driver, folder: str, name: str) -> Path:
    """A screenshot of the page as it is now, as OUTPUT/folder/name.png."""
    path = OUTPUT / folder / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def requested_urls(driver, origin: str) -> list[str]:
    """Every URL that pages of origin asked for since the last call (Chrome's performance
    log; the browser's own pages, such as the first empty tab, are left out)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            params = message["params"]
            if params.get("documentURL", "").startswith(origin + "/"):
                urls.append(params["request"]["url"])
    return urls


def console_problems(driver) -> list[str]:
    """The console's errors and warnings since the last call (CSP violations among them)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 0.2):
    """check()'s first true value within timeout seconds; else AssertionError naming what."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # the element is not there yet, or is being redrawn
            last_error = e
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last error: {last_error})")

"""Headless Chromium for the browser test and the README's screenshot script.

Debian's ``chromium`` and ``chromium-driver`` (Ubuntu's ``chromium-browser`` and
``chromium-chromedriver``), installed by ``scripts/install-system-deps.sh``: no browser
download at test time, and no network use beyond the loopback page under test.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from .system_deps import MissingSystemPackage


def find_chromium() -> tuple[str, str]:
    """The browser and its driver on PATH, or `MissingSystemPackage` naming what to install."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise MissingSystemPackage("headless Chromium", "chromium")
    driver = shutil.which("chromedriver")
    if driver is None:
        raise MissingSystemPackage("Chromium's driver (chromedriver)", "chromium-driver")
    return browser, driver


def headless_chromium(profile: Path, downloads: Path | None = None) -> webdriver.Chrome:
    """A 1440x900 headless browser with its own profile folder; background traffic off."""
    browser, driver = find_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1440,900",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    if downloads is not None:
        opts.add_experimental_option(
            "prefs",
            {"download.default_directory": str(downloads), "download.prompt_for_download": False},
        )
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium-manager: no usage statistics
    return webdriver.Chrome(options=opts, service=Service(driver))

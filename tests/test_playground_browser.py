"""The playground in a real headless Chromium, driven by Selenium.

The whole `gesal-bot run --platform local` path runs in-process (launch.serve →
runtime → service → engine), with the tiny model in place of SmolLM2 so the test takes
seconds. Chromium and chromedriver are Debian's (`.ci/run` installs them); nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from .chromium import headless_chromium
from .playground_server import PlaygroundServer
from .system_deps import MissingSystemPackage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_tokenizer, monkeypatch):
    for name in list(os.environ):
        if name.startswith(("DISCORD_", "SLACK_", "GESAL_", "REDIS_URL")) and name not in (
            "GESAL_CACHE_DIR",
        ):
            monkeypatch.delenv(name, raising=False)
    srv = PlaygroundServer(tiny_tokenizer, _free_port(), gesal_rate_user=100)
    url = srv.start()
    yield srv, url
    srv.stop()
    assert not srv.thread.is_alive(), "the server did not shut down"


@pytest.fixture
def browser(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    try:
        driver = headless_chromium(tmp_path / "profile", downloads)
    except MissingSystemPackage as exc:
        pytest.fail(str(exc), pytrace=False)
    driver.downloads = downloads  # type: ignore[attr-defined]
    yield driver
    driver.quit()


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


class Page:
    """Reads and clicks that survive the page re-rendering under us.

    The playground redraws the log and the graph when it polls, so an element found a
    moment ago can be detached by the time we read it. Reads go through one JavaScript
    call (atomic in the page) and clicks retry on a stale reference.
    """

    def __init__(self, driver) -> None:
        self.d = driver

    def text(self, css: str) -> str | None:
        return self.d.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;", css
        )

    def attr(self, css: str, name: str) -> str | None:
        return self.d.execute_script(
            "const e = document.querySelector(arguments[0]);"
            " return e ? e.getAttribute(arguments[1]) : null;",
            css,
            name,
        )

    def count(self, css: str) -> int:
        return len(self.d.find_elements(By.CSS_SELECTOR, css))

    def click(self, css: str) -> None:
        for _ in range(50):
            try:
                self.d.find_element(By.CSS_SELECTOR, css).click()
                return
            except StaleElementReferenceException:
                time.sleep(0.1)
        raise AssertionError(f"{css} kept going stale")


def test_click_through_the_whole_loop(server, browser, tmp_path):
    _, url = server
    d = browser
    page = Page(d)
    wait = WebDriverWait(d, 30, ignored_exceptions=(StaleElementReferenceException,))
    status = _get_json(url + "api/status")
    steps = [s["name"] for s in status["boot"]["steps"]]
    assert steps and steps[0] == "Redis store" and status["boot"]["ready"] is True
    assert all(s["state"] == "done" for s in status["boot"]["steps"])

    d.get(url)
    wait.until(EC.visibility_of_element_located((By.ID, "main")))
    assert "model tiny" in d.find_element(By.ID, "engine-info").text

    # a new channel, then a question as ada
    d.find_element(By.ID, "new-channel").send_keys("lab")
    d.find_element(By.ID, "create-channel").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "channel-title"), "#lab"))
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, '#channels li[data-channel="lab"]'))
    d.find_element(By.ID, "text").send_keys("@gesal hello world", "\n")
    wait.until(lambda _: page.count('.msg.bot[data-kind="answer"]') == 1)
    node_id = page.attr('.msg.bot[data-kind="answer"] .node', "data-node")
    assert "(new)" in page.text('.msg.bot[data-kind="answer"] .node')
    circle_css = f'#graph circle[data-node="{node_id}"]'
    wait.until(lambda _: page.count(circle_css) == 1)
    assert "answered" in page.attr(circle_css, "class")  # the ring marks the answering node
    grey = page.attr(circle_css, "fill")

    # a message without the mention gets no answer
    d.find_element(By.ID, "text").send_keys("just chatting", "\n")
    wait.until(lambda _: page.count("#log .msg") == 3)
    assert page.count(".msg.bot") == 1

    up, down = ".msg.bot .vote.up", ".msg.bot .vote.down"

    # ada 👍, ben 👎, then ada takes her 👍 back (toggle)
    page.click(up)
    wait.until(lambda _: "active" in page.attr(up, "class"))
    assert page.text(up) == "👍 1"
    Select(d.find_element(By.ID, "member")).select_by_value("ben")
    wait.until(lambda _: "active" not in page.attr(up, "class"))  # ben has not voted
    page.click(down)
    wait.until(lambda _: page.text(down) == "👎 1")
    Select(d.find_element(By.ID, "member")).select_by_value("ada")
    wait.until(lambda _: "active" in page.attr(up, "class"))
    page.click(up)
    wait.until(lambda _: page.text(up) == "👍 0")
    assert "active" not in page.attr(up, "class")
    assert page.text(".msg.bot .voters") == "ben 👎"

    # a correction; the half-written text survives the log re-rendering (here: switching
    # member there and back, which redraws every message)
    page.click(".msg.bot .suggest")
    d.find_element(By.CSS_SELECTOR, ".correct-text").send_keys("Hello! How")
    Select(d.find_element(By.ID, "member")).select_by_value("ben")
    wait.until(lambda _: "active" in page.attr(down, "class"))
    Select(d.find_element(By.ID, "member")).select_by_value("ada")
    wait.until(lambda _: "active" not in page.attr(down, "class"))
    area = d.find_element(By.CSS_SELECTOR, ".correct-text")
    assert area.get_attribute("value") == "Hello! How"
    area.send_keys(" can I help?")
    page.click(".correct-send")
    wait.until(
        EC.text_to_be_present_in_element(
            (By.CSS_SELECTOR, ".msg.bot .corrections"), "ada: Hello! How can I help?"
        )
    )
    assert page.count(".correct-box") == 0  # sent: the box closes
    # a second box can be cancelled; nothing is sent
    page.click(".msg.bot .suggest")
    d.find_element(By.CSS_SELECTOR, ".correct-text").send_keys("never mind")
    page.click(".correct-cancel")
    wait.until(lambda _: page.count(".correct-box") == 0)
    assert "never mind" not in page.text(".msg.bot .corrections")
    wait.until(EC.text_to_be_present_in_element((By.ID, "schedule"), "waiting"))
    assert page.text("#schedule").startswith("4 vote(s)")

    # train now: the node's z version moves and its colour turns to the (negative) reward
    d.find_element(By.ID, "train").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "admin-out"), "Training done"))
    wait.until(lambda _: page.attr(circle_css, "data-version") == "1")
    assert page.attr(circle_css, "fill") != grey
    schedule = page.text("#schedule")
    assert schedule.startswith("0 vote(s)") and "every 3600" in schedule and "next" in schedule
    assert "trains once 8 replies have feedback" in schedule  # GESAL_TRAIN_ROUND

    # a second, different question makes a second node
    d.find_element(By.ID, "text").send_keys("@gesal 0123456789 the lazy dog", "\n")
    wait.until(lambda _: page.count("#graph circle") == 2)

    # stats and threshold
    d.find_element(By.ID, "stats").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "admin-out"), "2 nodes"))
    field = d.find_element(By.ID, "threshold")
    field.clear()
    field.send_keys("0.5")
    d.find_element(By.ID, "set-threshold").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "admin-out"), "threshold 0.5"))

    # export downloads the channel's JSON
    d.find_element(By.ID, "export").click()
    deadline = time.time() + 20
    files: list[Path] = []
    while time.time() < deadline and not files:
        files = [p for p in d.downloads.glob("*.json")]  # type: ignore[attr-defined]
        time.sleep(0.2)
    assert files, "no export was downloaded"
    exported = json.loads(files[0].read_text())
    assert exported["channel"] == "playground:local:lab" and len(exported["nodes"]) == 2

    # reset asks first; cancel keeps everything, confirm empties the channel
    d.find_element(By.ID, "reset").click()
    wait.until(EC.visibility_of_element_located((By.ID, "reset-confirm")))
    assert "2 nodes" in d.find_element(By.ID, "reset-text").text
    d.find_element(By.ID, "reset-no").click()
    assert page.count("#graph circle") == 2
    d.find_element(By.ID, "reset").click()
    wait.until(EC.visibility_of_element_located((By.ID, "reset-yes"))).click()
    wait.until(lambda _: page.count("#graph circle") == 0)
    assert not d.find_elements(By.CSS_SELECTOR, "#log .msg")

    # import the export back through the file picker: both nodes return
    d.find_element(By.ID, "import-file").send_keys(str(files[0]))
    wait.until(EC.text_to_be_present_in_element((By.ID, "admin-out"), "Imported 2 nodes"))
    wait.until(lambda _: page.count("#graph circle") == 2)

    shot = tmp_path / "playground.png"
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    metrics = urllib.request.urlopen(url + "metrics", timeout=10).read().decode()
    assert 'gesal_replies_total{platform="playground"} 2.0' in metrics
    health = _get_json(url + "healthz")
    assert health["ok"] is True and health["last_training"]["age_seconds"] is not None

"""Take the README's picture of the playground on the real bundled model.

    .venv/bin/python scripts/playground_screenshot.py [docs/playground.png]

Starts `gesal-bot run --platform local` (bundled SmolLM2, embedded Redis in a temporary
data dir), asks a few questions as different members in headless Chromium, votes,
trains, and saves a screenshot. It prints what it did, so the picture is reproducible.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from gesal_core.records import ChannelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
from tests.chromium import headless_chromium  # noqa: E402

QUESTIONS = [
    ("ada", "@gesal What is Redis, in one sentence?"),
    ("ben", "@gesal Give me a tip for writing clean Python."),
    ("chloé", "@gesal What is the capital of France?"),
]
VOTES = [(0, "ada", "up"), (0, "ben", "up"), (1, "chloé", "down"), (2, "dev", "up")]


def main(out: str = "docs/playground.png") -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tempfile.mkdtemp(prefix="gesal-shot-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "SLACK_"))}
    env.pop("REDIS_URL", None)
    env["GESAL_DATA_DIR"] = data
    server = subprocess.Popen(
        [Path(sys.executable).with_name("gesal-bot"), "run", "--platform", "local"]
        + ["--port", str(port)],
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    driver = None
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        driver = headless_chromium(Path(data) / "chrome")
        d, wait = driver, WebDriverWait(driver, 600)
        d.get(url)
        wait.until(EC.visibility_of_element_located((By.ID, "main")))
        # the channel's default threshold: routing compares centred embeddings, and the
        # default θ is the one measured for them (`bench.embedding_choice`)
        print(f"threshold: the default θ = {ChannelConfig().threshold}")
        for member, text in QUESTIONS:
            Select(d.find_element(By.ID, "member")).select_by_value(member)
            before = len(d.find_elements(By.CSS_SELECTOR, ".msg.bot"))
            d.find_element(By.ID, "text").send_keys(text, "\n")
            wait.until(lambda _, n=before: len(d.find_elements(By.CSS_SELECTOR, ".msg.bot")) > n)
            print(f"{member}: {text}")
        for index, member, vote in VOTES:
            Select(d.find_element(By.ID, "member")).select_by_value(member)
            time.sleep(0.5)  # the page re-renders the log after each vote
            bot = d.find_elements(By.CSS_SELECTOR, ".msg.bot")[index]
            bot.find_element(By.CSS_SELECTOR, f".vote.{vote}").click()
            time.sleep(1.0)
            print(f"{member} voted {vote} on answer {index + 1}")
        d.find_element(By.ID, "train").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "admin-out"), "Training done"))
        print(d.find_element(By.ID, "admin-out").text)
        d.find_elements(By.CSS_SELECTOR, ".msg.bot .node")[0].click()
        time.sleep(1)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(out)
        print(f"saved {out}")
        return 0
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

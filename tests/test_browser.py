"""The tutorial's last step in a real browser: the README's `pf flow serve` command, Prompt flow's chat page
at `/` in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium), two turns of chat
against the real endpoint through the real connection.

What the page sends and what `pf flow serve` answers are read from Chromium's own network log (DevTools
events), not from the page's code, so the follow-up's chat history is checked as it went over the wire.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
from pathlib import Path

import pytest
from support import BIN, REPO, Process, free_port, wait_for


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver in /usr/bin (apt-get install -y chromium chromium-driver; "
    ".ci/run installs them)",
)

README = REPO / "README.md"
DEMO = REPO / "finetune_phi" / "demo.py"
FIRST = "What is the capital of France?"
FOLLOW_UP = "And which language do people speak there?"


def readme_serve_command() -> list[str]:
    """The `pf flow serve` command exactly as the README writes it (its trailing comment dropped)."""
    lines = [line for line in README.read_text().splitlines() if line.startswith("pf flow serve ")]
    assert len(lines) == 1, f"README should show one `pf flow serve` command, has {lines}"
    return shlex.split(lines[0], comments=True)


def demo_serve_command() -> list[str]:
    """The `pf flow serve` command the demo prints at the end, with its flow path as the README writes it."""
    lines = re.findall(r'print\(\s*f?"\s*(pf flow serve [^"]*)"\s*\)', DEMO.read_text())
    assert len(lines) == 1, f"demo.py should print one `pf flow serve` command, has {lines}"
    return shlex.split(lines[0].replace("{chat_flow}", "flows/chat"), comments=True)


def test_readme_and_demo_print_the_same_serve_command():
    readme = readme_serve_command()
    assert demo_serve_command() == readme
    # the Flask engine's GET / fails to render the page ("Failed to render jinja template")
    assert readme[readme.index("--engine") + 1] == "fastapi"


@pytest.fixture
def chat_page(connected, test_root):
    """The README's `pf flow serve` on a free port, run from the repo root with the tests' Prompt flow home."""
    cmd = readme_serve_command()
    port = free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    log_path = test_root / "pf-serve-browser.log"
    # PF_HOME_DIRECTORY from the environment: where `connected` made the connection
    server = Process([BIN / cmd[0], *cmd[1:]], log_path, cwd=REPO, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_for_url(url + "/health", timeout=120)
        yield url, log_path
    finally:
        server.stop()


class Wire:
    """POST /score exchanges between the page and `pf flow serve`, from Chromium's DevTools network events."""

    def __init__(self, driver):
        self.driver, self.requests, self.done = driver, {}, {}

    def poll(self) -> list[dict]:
        for entry in self.driver.get_log("performance"):  # returns only what is new since the last call
            msg = json.loads(entry["message"])["message"]
            params = msg.get("params", {})
            if msg["method"] == "Network.requestWillBeSent":
                req = params["request"]
                if req["method"] == "POST" and req["url"].endswith("/score"):
                    self.requests[params["requestId"]] = {"body": json.loads(req.get("postData") or "null")}
            elif msg["method"] == "Network.responseReceived" and params["requestId"] in self.requests:
                self.requests[params["requestId"]]["status"] = params["response"]["status"]
            elif msg["method"] == "Network.loadingFinished" and params["requestId"] in self.requests:
                body = self.driver.execute_cdp_cmd("Network.getResponseBody", {"requestId": params["requestId"]})
                self.requests[params["requestId"]]["response"] = json.loads(body["body"])
                self.done[params["requestId"]] = self.requests[params["requestId"]]
        return list(self.done.values())


def inputs_by_label(driver) -> dict:
    """The page's input fields by their label ("question", "deployment"), and the labels as shown."""
    from selenium.webdriver.common.by import By

    fields, labels = {}, {}
    for field in driver.find_elements(By.CSS_SELECTOR, "input.fui-Input__input"):
        label = driver.find_element(By.CSS_SELECTOR, f'label[for="{field.get_attribute("id")}"]').text
        name = label.replace("*", "").strip()
        fields[name], labels[name] = field, label
    return fields, labels


def answers_shown(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, '[data-from="chatbot"] .fui-FluentProvider')]


def ask(driver, wire, question: str, deployment: str | None, turn: int, timeout: float = 180, **more: str) -> dict:
    """Type into the page as a user would (Enter sends) and wait for the answer to be shown."""
    from selenium.webdriver.common.keys import Keys

    fields, _ = inputs_by_label(driver)
    if deployment is not None:
        fields["deployment"].send_keys(deployment)
    for name, value in more.items():  # the page clears every field after a send and insists on each
        fields[name].send_keys(value)
    fields["question"].send_keys(question)
    fields["question"].send_keys(Keys.ENTER)
    wait_for(
        lambda: len(wire.poll()) >= turn and len(answers_shown(driver)) >= turn,
        f"turn {turn}'s answer on the page (exchanges so far {wire.done})",
        timeout,
        interval=0.3,
    )
    return wire.poll()[turn - 1]


def same_text(shown: str, answer: str) -> bool:
    """The page renders the answer as markdown: compare letters and digits only."""
    norm = lambda s: re.sub(r"\W+", "", s)  # noqa: E731
    return difflib.SequenceMatcher(None, norm(shown), norm(answer)).ratio() > 0.8


@pytest.mark.slow
def test_chat_page_answers_and_sends_the_history(chat_page, browser, test_root):
    url, log_path = chat_page
    screenshot = Path(os.environ.get("FINETUNE_PHI_CHAT_SCREENSHOT", test_root / "chat_page.png"))
    wire = Wire(browser)
    try:
        browser.get(url + "/")
        # the flow's other inputs (temperature, max_tokens) come with samples.json's values filled in
        wait_for(
            lambda: {"question", "deployment"} <= set(inputs_by_label(browser)[0]),
            "the chat page's question and deployment fields",
            60,
            interval=0.3,
        )
        fields, labels = inputs_by_label(browser)
        # the page insists on a value in every field; the flow's samples.json starts `deployment` at "*",
        # which the flow takes as the traffic split, so a first question needs nothing else typed
        assert fields["deployment"].get_attribute("value") == "*", labels

        first = ask(browser, wire, FIRST, None, turn=1)
        # samples.json's values: the tutorial's temperature, the endpoint's answer length
        assert first["body"] == {
            "question": FIRST,
            "deployment": "*",
            "chat_history": [],
            "temperature": 0.7,
            "max_tokens": 0,
        }
        assert first["status"] == 200, first
        answer1 = first["response"]["answer"]
        assert answer1.strip()

        # the page clears every field after a send: the follow-up pins the fine-tuned deployment
        follow = ask(browser, wire, FOLLOW_UP, "ft", turn=2, temperature="0", max_tokens="0")
        browser.save_screenshot(str(screenshot))
        assert follow["status"] == 200, follow
        assert follow["body"]["question"] == FOLLOW_UP and follow["body"]["deployment"] == "ft"
        assert follow["body"]["temperature"] == 0 and follow["body"]["max_tokens"] == 0  # greedy, as typed
        history = follow["body"]["chat_history"]
        assert len(history) == 1, history
        assert history[0]["inputs"]["question"] == FIRST and history[0]["outputs"]["answer"] == answer1
        answer2 = follow["response"]["answer"]
        assert answer2.strip()

        shown = answers_shown(browser)
        assert len(shown) == 2 and same_text(shown[0], answer1) and same_text(shown[1], answer2), (
            shown,
            answer1,
            answer2,
        )
        assert len(wire.poll()) == 2
    except BaseException:
        browser.save_screenshot(str(screenshot))
        print(f"screenshot: {screenshot}\npf flow serve log:\n{log_path.read_text()[-3000:]}")
        raise

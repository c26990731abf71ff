"""The playground in a real headless browser (Debian's chromium through its chromedriver,
driven by Selenium; nothing is downloaded) against a real server of the default model with
an API key: what the page shows equals what the API answers for the same request, Stop
frees the request's KV blocks, and the server's errors are shown as it wrote them.

PALM_UPDATE_SCREENSHOT=1 also saves docs/playground.png, taken mid-generation."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

import palm_serve.model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # the HTTP tests' helpers
from server_helpers import ServerThread, metric, parse_metrics, running_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MODEL_DIR = Path(palm_serve.model.__file__).parent / "default"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "playground.png"
KEY = "browser-test-key"
GUARD = 60  # seconds: a bound on waiting, never a timed assertion
# What the page sends for the fields a test leaves as they are (index.html's values).
PAGE_DEFAULTS = {"top_p": 0.9, "top_k": 0, "repetition_penalty": 1.0}

pytestmark = pytest.mark.skipif(
    not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
    reason="the browser tests need Debian's chromium and chromium-driver "
    "(apt-get install chromium chromium-driver; .ci/run installs them)",
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server(MODEL_DIR, api_key=KEY, max_tokens_limit=1000) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver, server: ServerThread) -> Iterator[WebDriver]:
    """The playground freshly loaded, the right key typed; no script error or CSP
    violation while the test ran."""
    browser.get(f"{server.url}/")
    fill(browser, "api-key", KEY)
    yield browser
    problems = [
        e["message"]
        for e in browser.get_log("browser")
        if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
    ]
    assert not problems


# ---- Driving the page --------------------------------------------------------------


def fill(driver: WebDriver, field: str, value: object) -> None:
    element = driver.find_element(By.ID, field)
    element.clear()
    element.send_keys(str(value))


def choose(driver: WebDriver, mode: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'input[name="mode"][value="{mode}"]').click()


def send(driver: WebDriver, text: str) -> None:
    """Type into the prompt box and send with Ctrl+Enter."""
    fill(driver, "prompt", text)
    driver.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)


def state(driver: WebDriver) -> str:
    return driver.execute_script("return document.body.dataset.state")


def wait_idle(driver: WebDriver) -> None:
    WebDriverWait(driver, GUARD, poll_frequency=0.05).until(lambda d: state(d) == "idle")


def text_of(driver: WebDriver, element_id: str) -> str:
    # textContent: exactly the characters on the page (Selenium's .text trims whitespace).
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def token_spans(driver: WebDriver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#output span.token")


def api(server: ServerThread, path: str, key: str = KEY, **body: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=GUARD)


def samples(server: ServerThread) -> dict:
    return parse_metrics(httpx.get(f"{server.url}/metrics").text)


# ---- The tests ---------------------------------------------------------------------


def test_greedy_completion_on_the_page_equals_the_api(
    page: WebDriver, server: ServerThread
) -> None:
    prompt = "And the LORD said unto Moses,"
    fill(page, "temperature", 0)
    fill(page, "max_tokens", 40)
    send(page, prompt)
    wait_idle(page)
    body = dict(prompt=prompt, max_tokens=40, temperature=0, **PAGE_DEFAULTS)
    expected = api(server, "/v1/generate", **body).json()
    assert text_of(page, "output") == expected["text"]
    assert text_of(page, "tokens") == str(expected["usage"]["completion_tokens"])
    assert text_of(page, "finish") == expected["finish_reason"]
    assert text_of(page, "ttft").endswith(" ms")
    # Everything the page loaded or called came from this server.
    urls = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(url.startswith(f"{server.url}/") for url in urls)


def test_chat_turns_on_the_page_equal_the_api(page: WebDriver, server: ServerThread) -> None:
    choose(page, "chat")
    fill(page, "temperature", 0)
    fill(page, "max_tokens", 24)
    messages: list[dict] = []
    for message in ("Who shall deliver Israel?", "And what said the king?"):
        send(page, message)
        wait_idle(page)
        messages.append({"role": "user", "content": message})
        body = dict(messages=messages, max_tokens=24, temperature=0, **PAGE_DEFAULTS)
        answer = api(server, "/v1/chat/completions", **body).json()["choices"][0]
        assert text_of(page, "output") == answer["message"]["content"]
        assert text_of(page, "finish") == answer["finish_reason"]
        messages.append({"role": "assistant", "content": answer["message"]["content"]})
    # Both turns stay on the page, each user message before its answer.
    turns = page.find_elements(By.CSS_SELECTOR, "#transcript .turn")
    assert [t.get_attribute("class") for t in turns] == ["turn user", "turn assistant"] * 2


def test_sampled_tokens_are_coloured_with_their_alternatives(
    page: WebDriver, server: ServerThread
) -> None:
    """A seeded sample with colouring on (the screenshot is taken mid-way): each token
    span carries its probability and the top alternatives, as the API reports them."""
    body = dict(prompt="And the LORD said unto Moses,", max_tokens=80, temperature=0.8, seed=1)
    fill(page, "temperature", body["temperature"])
    fill(page, "seed", body["seed"])
    fill(page, "max_tokens", body["max_tokens"])
    page.find_element(By.ID, "colour").click()
    send(page, str(body["prompt"]))
    WebDriverWait(page, GUARD, poll_frequency=0.02).until(
        lambda d: len(token_spans(d)) >= 30 or state(d) == "idle"
    )
    if os.environ.get("PALM_UPDATE_SCREENSHOT") == "1":
        assert state(page) == "generating", "the generation ended before the screenshot"
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.execute_script("window.scrollTo(0, 0)")
        page.save_screenshot(str(SCREENSHOT))
    wait_idle(page)
    expected = api(server, "/v1/generate", **body, **PAGE_DEFAULTS, logprobs=5).json()
    assert text_of(page, "output") == expected["text"]
    spans = token_spans(page)
    first = expected["logprobs"][0]
    title = spans[0].get_attribute("title").split("\n")
    assert title[0].startswith(json.dumps(first["token"], ensure_ascii=False))
    assert f"{100 * math.exp(first['logprob']):.1f}%" in title[0]
    alternatives = [json.dumps(t["token"], ensure_ascii=False) for t in first["top_logprobs"]]
    assert [line.strip().rsplit(" ", 1)[0] for line in title[1:]] == alternatives
    assert all(span.get_attribute("class") in {f"token p{i}" for i in range(5)} for span in spans)


def test_stop_aborts_the_request_and_frees_its_kv_blocks(
    page: WebDriver, server: ServerThread
) -> None:
    aborted_before = metric(samples(server), "palm_requests_finished_total", finish_reason="abort")
    fill(page, "temperature", 0)  # greedy: this model loops, never ending before max_tokens
    fill(page, "max_tokens", 1000)
    send(page, "In the beginning")
    WebDriverWait(page, GUARD, poll_frequency=0.02).until(
        lambda d: len(text_of(d, "output")) >= 60 or state(d) == "idle"
    )
    assert state(page) == "generating"
    assert metric(samples(server), "palm_kv_cache_usage_ratio") > 0
    page.find_element(By.ID, "stop-button").click()
    wait_idle(page)
    assert text_of(page, "finish") == "stopped"
    deadline = time.monotonic() + GUARD
    while True:
        now = samples(server)
        freed = metric(now, "palm_kv_cache_usage_ratio") == 0
        aborted = metric(now, "palm_requests_finished_total", finish_reason="abort")
        if freed and aborted == aborted_before + 1:
            break
        assert time.monotonic() < deadline, "the stopped request kept its KV blocks"
        time.sleep(0.05)
    assert metric(now, "palm_num_requests_running") == 0


@pytest.mark.parametrize("key", ["wrong-key", ""])
def test_a_wrong_or_missing_key_shows_the_servers_401(
    page: WebDriver, server: ServerThread, key: str
) -> None:
    fill(page, "api-key", key)
    send(page, "Hello")
    wait_idle(page)
    refused = api(server, "/v1/generate", key=key, prompt="Hello", stream=True)
    assert refused.status_code == 401
    assert page.find_element(By.ID, "error").is_displayed()
    assert text_of(page, "error-status") == "HTTP 401"
    assert text_of(page, "error-message") == refused.json()["error"]["message"]
    assert text_of(page, "output") == ""


def test_a_refused_chat_turn_shows_the_servers_400_and_is_taken_back(
    page: WebDriver, server: ServerThread
) -> None:
    choose(page, "chat")
    fill(page, "top_p", 0)
    send(page, "Hello")
    wait_idle(page)
    body = dict(messages=[{"role": "user", "content": "Hello"}], max_tokens=128, top_p=0)
    refused = api(server, "/v1/chat/completions", **body)
    assert refused.status_code == 400
    assert text_of(page, "error-status") == "HTTP 400"
    assert text_of(page, "error-message") == refused.json()["error"]["message"]
    # The message goes back into the box to be sent again; the conversation is unchanged.
    assert page.find_elements(By.CSS_SELECTOR, "#transcript .turn") == []
    assert page.find_element(By.ID, "prompt").get_property("value") == "Hello"


def test_a_narrow_window_needs_no_sideways_scrolling(page: WebDriver) -> None:
    size = page.get_window_size()
    page.set_window_size(360, 740)
    try:
        overflow = page.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        assert page.find_element(By.ID, "send").is_displayed()
    finally:
        page.set_window_size(size["width"], size["height"])

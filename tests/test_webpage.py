"""The web page in a real headless Chromium against the server on loopback (uvicorn in a
thread, tiny real exports): type a prompt, click Generate, an image appears; a bad setting
shows the server's 422 message."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from exports import cached_exports, one_torch_thread
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from pipeline.server import ServerSettings, create_app
from pipeline.text2image import Text2Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 60


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    pipe = Text2Image.from_exports(cached_exports(tmp_path_factory), "cpu", "fp32")
    app = create_app(pipe, ServerSettings(default_steps=2, max_steps=10))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with others
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"the web page test needs Chromium ({', '.join(missing)} missing): "
            "apt-get install chromium chromium-driver"
        )
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open_page(browser, url: str) -> WebDriverWait:
    browser.get(url)
    wait = WebDriverWait(browser, WAIT_S)
    # /config has been applied once the sampler list is filled.
    expected = len(ServerSettings().samplers)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sampler option")) == expected)
    return wait


def _set(browser, element_id: str, value: str) -> None:
    element = browser.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def test_typing_a_prompt_and_clicking_generate_shows_an_image(browser, server_url):
    wait = _open_page(browser, server_url)
    assert browser.find_element(By.ID, "steps").get_attribute("max") == "10"
    _set(browser, "prompt", "red apple; flat colour emoji")
    _set(browser, "seed", "42")
    browser.find_element(By.ID, "generate").click()
    image = wait.until(
        expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, "#results img[src^='data:image/png;base64,']")
        )
    )
    wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", image) > 0)
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 16
    settings = browser.find_element(By.CSS_SELECTOR, "#results .settings").text
    assert "red apple; flat colour emoji" in settings and "seed 42" in settings
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None


def test_an_out_of_range_setting_shows_the_servers_message(browser, server_url):
    wait = _open_page(browser, server_url)
    _set(browser, "prompt", "black heart")
    _set(browser, "steps", "999")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait.until(lambda d: error.is_displayed())
    assert "Invalid settings" in error.text and "steps" in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#results img")

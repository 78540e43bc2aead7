"""The web page in a real headless Chromium against the server on loopback (uvicorn in a
thread, tiny real exports): type a prompt, click Generate, an image appears; a bad setting
shows the server's 422 message; an uploaded image is the start of image-to-image."""

from __future__ import annotations

import base64
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from pipeline.server import ServerSettings, allowed_host_names, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 60
TOKEN = "page-token"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server_url(pipe):
    # As `serve --token` on loopback: the page must pass the token, Origin and Host checks.
    settings = ServerSettings(
        default_steps=2, max_steps=10, token=TOKEN, allowed_hosts=allowed_host_names("127.0.0.1")
    )
    app = create_app(pipe, settings)
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
    yield f"http://127.0.0.1:{port}/?token={TOKEN}"
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


def test_without_the_token_the_page_says_it_is_needed(browser, server_url):
    wait = _open_page(browser, server_url.split("?")[0])
    _set(browser, "prompt", "black heart")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait.until(lambda d: error.is_displayed())
    assert "Token needed" in error.text and "bearer token" in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#results img")


def test_an_out_of_range_setting_shows_the_servers_message(browser, server_url):
    wait = _open_page(browser, server_url)
    _set(browser, "prompt", "black heart")
    _set(browser, "steps", "999")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait.until(lambda d: error.is_displayed())
    assert "Invalid settings" in error.text and "steps" in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#results img")


def test_the_guidance_interval_is_sent_and_a_reversed_one_is_refused(browser, server_url):
    wait = _open_page(browser, server_url)
    lo, hi = (browser.find_element(By.ID, f"cfg_{end}") for end in ("lo", "hi"))
    assert (lo.get_attribute("value"), hi.get_attribute("value")) == ("0", "1")
    _set(browser, "prompt", "black heart")
    _set(browser, "cfg_lo", "0.8")
    _set(browser, "cfg_hi", "0.2")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait.until(lambda d: error.is_displayed())
    assert "Invalid settings" in error.text and "cfg_interval" in error.text
    _set(browser, "cfg_lo", "0.2")
    _set(browser, "cfg_hi", "0.8")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results img"))
    settings = browser.find_element(By.CSS_SELECTOR, "#results .settings").text
    assert "guided at t in [0.2, 0.8]" in settings


def _results_png(browser) -> bytes:
    src = browser.find_element(By.CSS_SELECTOR, "#results img").get_attribute("src")
    return base64.b64decode(src.split(",", 1)[1])


def test_an_uploaded_image_is_the_start_of_image_to_image(browser, server_url, pipe, tmp_path):
    path = tmp_path / "start.png"
    pixels = np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    wait = _open_page(browser, server_url)
    strength = browser.find_element(By.ID, "strength")
    assert strength.get_attribute("disabled") is not None  # nothing to start from yet
    browser.find_element(By.ID, "init_image").send_keys(str(path))
    wait.until(lambda d: browser.find_element(By.ID, "init_preview").is_displayed())
    assert strength.get_attribute("disabled") is None and strength.get_attribute("value") == "0.6"
    browser.execute_script(
        "arguments[0].value = '0.5'; arguments[0].dispatchEvent(new Event('input'))", strength
    )
    _set(browser, "prompt", "red apple; flat colour emoji")
    _set(browser, "seed", "7")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results img"))
    settings = browser.find_element(By.CSS_SELECTOR, "#results .settings").text
    assert "from an image at strength 0.5" in settings
    # The page sent the file itself: the server's image is the pipeline's on that file.
    expected = pipe.generate(
        ["red apple; flat colour emoji"],
        seed=7,
        steps=2,
        init_image=Image.open(path),
        strength=0.5,
    )[0]
    assert _results_png(browser) == expected.png()


def test_an_image_the_server_refuses_shows_its_message(browser, server_url, tmp_path):
    path = tmp_path / "animation.gif"
    Image.new("RGB", (16, 16), "red").save(path)
    wait = _open_page(browser, server_url)
    browser.find_element(By.ID, "init_image").send_keys(str(path))
    _set(browser, "prompt", "black heart")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait.until(lambda d: error.is_displayed())
    assert "Invalid settings: init_image: the init image is GIF" in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#results img")
    browser.find_element(By.ID, "clear_image").click()
    assert not browser.find_element(By.ID, "init_preview").is_displayed()
    assert browser.find_element(By.ID, "strength").get_attribute("disabled") is not None

"""The HTTP API on tiny real exports: health, config, generate, every 4xx/503/504 path, and
concurrent requests each answered with the image of its own seed."""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from exports import RESOLUTION
from fastapi.testclient import TestClient
from PIL import Image

from pipeline.init_image import InitImageLimits
from pipeline.png import read_png_text
from pipeline.server import ServerSettings, create_app
from pipeline.text2image import Text2Image

SETTINGS = ServerSettings(
    max_steps=8,
    default_steps=2,
    max_n=3,
    max_prompt_chars=40,
    init_image=InitImageLimits(max_bytes=64 * 1024, max_pixels=256 * 256),
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, SETTINGS)) as client:
        yield client


class GatedPipeline:
    """Blocks every generation until ``gate`` is set (a slow GPU on demand), then answers
    at once with images made beforehand, so no timing depends on this machine's speed."""

    def __init__(self, pipe: Text2Image):
        self.device, self.hashes, self.resolution = pipe.device, pipe.hashes, pipe.resolution
        self.images = pipe.generate(["a"], seed=0, steps=1)
        self.gate = threading.Event()
        self.started = threading.Event()

    def generate(self, prompts, **kwargs):
        self.started.set()
        self.gate.wait(30)
        return self.images * len(prompts)


def png_of(data_uri: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert data_uri.startswith(prefix)
    return base64.b64decode(data_uri[len(prefix) :])


def test_health_reports_models_device_and_hashes(client, pipe):
    body = client.get("/health").json()
    assert body["models_loaded"] is True
    assert body["device"] == "cpu"
    assert body["hashes"] == pipe.hashes and set(body["hashes"]) == {"vae", "clip", "unet"}
    assert body["queue"]["capacity"] == SETTINGS.queue_size


def test_config_gives_ranges_and_defaults(client):
    body = client.get("/config").json()
    assert body["steps"] == {"min": 1, "max": 8, "default": 2}
    assert body["n"]["max"] == 3 and body["prompt"]["max_chars"] == 40
    assert body["samplers"] == ["euler", "heun", "ddim", "ancestral"]
    assert body["resolution"] == RESOLUTION


def test_generate_returns_png_data_uris_with_settings(client, pipe):
    request = {"prompt": "red apple", "negative_prompt": "blue", "seed": 21, "n": 2}
    response = client.post("/generate", json={**request, "steps": 3, "cfg_scale": 6.5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [image["seed"] for image in body["images"]] == [21, 22]
    assert body["settings"]["steps"] == 3 and body["settings"]["sampler"] == "euler"
    assert body["hashes"] == pipe.hashes
    png = png_of(body["images"][1]["data_uri"])
    text = read_png_text(png)
    assert (text["prompt"], text["negative_prompt"], text["seed"]) == ("red apple", "blue", "22")
    assert text["cfg_scale"] == "6.5" and text["unet_hash"] == pipe.hashes["unet"]
    # The server adds nothing random: the same request through the pipeline gives the same PNG.
    direct = pipe.generate(
        ["red apple"] * 2, negative_prompt="blue", seed=21, steps=3, cfg_scale=6.5
    )
    assert png == direct[1].png()


def test_the_guidance_interval_reaches_the_pipeline_and_the_png(client, pipe):
    assert client.get("/config").json()["cfg_interval"] == {
        "min": 0.0,
        "max": 1.0,
        "default": [0.0, 1.0],
    }
    body = {"prompt": "red apple", "seed": 4, "steps": 4}
    full = client.post("/generate", json=body).json()["images"][0]
    same = client.post("/generate", json={**body, "cfg_interval": [0, 1]}).json()
    assert same["images"][0]["data_uri"] == full["data_uri"]
    limited = client.post("/generate", json={**body, "cfg_interval": [0.3, 0.8]}).json()
    assert limited["settings"]["cfg_interval"] == [0.3, 0.8]
    png = png_of(limited["images"][0]["data_uri"])
    assert read_png_text(png)["cfg_interval"] == "0.3,0.8"
    direct = pipe.generate(["red apple"], seed=4, steps=4, cfg_interval=(0.3, 0.8))
    assert png == direct[0].png() and png != png_of(full["data_uri"])


def test_same_seed_same_image_and_a_seed_is_picked_when_none_given(client):
    def first(body):
        response = client.post("/generate", json=body)
        assert response.status_code == 200, response.text
        return response.json()["images"][0]

    a, b = first({"prompt": "black heart", "seed": 5}), first({"prompt": "black heart", "seed": 5})
    assert a["data_uri"] == b["data_uri"]
    picked = first({"prompt": "black heart"})
    assert isinstance(picked["seed"], int) and picked["seed"] >= 0
    assert (
        first({"prompt": "black heart", "seed": picked["seed"]})["data_uri"] == picked["data_uri"]
    )


@pytest.mark.parametrize("how", ["accept", "format"])
def test_raw_png_when_asked(client, how):
    body = {"prompt": "red apple", "seed": 3}
    if how == "format":
        response = client.post("/generate", json={**body, "format": "png"})
    else:
        response = client.post("/generate", json=body, headers={"Accept": "image/png"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "3"
    assert read_png_text(response.content)["seed"] == "3"


def test_raw_png_needs_n_1(client):
    response = client.post("/generate", json={"prompt": "x", "n": 2, "format": "png"})
    assert response.status_code == 422
    assert "n: must be 1" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 41}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "negative_prompt": "y" * 41}, "negative_prompt"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "steps": 9}, "steps"),
        ({"prompt": "x", "steps": "many"}, "steps"),
        ({"prompt": "x", "cfg_scale": 21}, "cfg_scale"),
        ({"prompt": "x", "cfg_scale": -1}, "cfg_scale"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 4}, "n"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "sampler": "dpm++"}, "sampler"),
        ({"prompt": "x", "colour": "red"}, "colour"),
        ({"prompt": "x", "cfg_interval": [-0.1, 0.5]}, "cfg_interval.0"),
        ({"prompt": "x", "cfg_interval": [0.2, 1.5]}, "cfg_interval.1"),
        ({"prompt": "x", "cfg_interval": [0.8, 0.2]}, "cfg_interval"),
        ({"prompt": "x", "cfg_interval": [0.5]}, "cfg_interval.1"),
    ],
)
def test_bad_requests_get_a_readable_422(client, body, field):
    response = client.post("/generate", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.startswith(f"{field}:"), detail


def test_malformed_json_is_a_422(client):
    response = client.post(
        "/generate", content=b'{"prompt": ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON" in response.json()["detail"]


def test_oversized_body_is_a_413_by_header_and_by_stream(client):
    # The limit allows the largest init image on top of the rest of the body.
    assert SETTINGS.body_limit > SETTINGS.init_image.max_bytes * 4 // 3 + SETTINGS.max_body_bytes
    big = b'{"prompt": "' + b"x" * (SETTINGS.body_limit + 10) + b'"}'
    response = client.post("/generate", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "larger than" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold while reading the stream
        yield big[:100]
        yield big[100:]

    response = client.post(
        "/generate", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert "larger than" in response.json()["detail"]


def test_full_queue_is_a_503_and_queued_work_still_finishes(pipe):
    slow = GatedPipeline(pipe)
    app = create_app(slow, ServerSettings(queue_size=1, default_steps=2))
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/generate", json={"prompt": "a", "seed": 1})
        assert slow.started.wait(10)
        queued = pool.submit(client.post, "/generate", json={"prompt": "b", "seed": 2})
        deadline = time.monotonic() + 10
        while app.state.worker.pending < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = client.post("/generate", json={"prompt": "c", "seed": 3})
        assert refused.status_code == 503
        assert "busy" in refused.json()["detail"] and refused.headers["retry-after"]
        slow.gate.set()
        assert running.result().status_code == 200
        assert queued.result().status_code == 200


def test_slow_generation_is_a_504(pipe):
    slow = GatedPipeline(pipe)
    app = create_app(slow, ServerSettings(timeout_s=0.2, default_steps=2))
    with TestClient(app) as client:
        response = client.post("/generate", json={"prompt": "a"})
        assert response.status_code == 504
        assert "0.2 s" in response.json()["detail"]
        slow.gate.set()
        # The worker is free again afterwards.
        assert client.post("/generate", json={"prompt": "a", "seed": 0}).status_code == 200


def test_a_failing_generation_is_a_500_with_the_reason_in_the_log(pipe, caplog):
    class Failing(GatedPipeline):
        def generate(self, prompts, **kwargs):
            raise RuntimeError("CUDA out of memory (simulated)")

    with TestClient(create_app(Failing(pipe), ServerSettings(default_steps=2))) as client:
        response = client.post("/generate", json={"prompt": "a"})
        assert response.status_code == 500
        assert "out of memory" not in response.json()["detail"]
        assert "out of memory" in caplog.text
        assert client.get("/health").status_code == 200


def test_concurrent_requests_each_get_their_own_image(client, pipe):
    seeds = list(range(100, 106))
    expected = {s: pipe.generate(["red apple"], seed=s, steps=2)[0].png() for s in seeds}

    def ask(seed):
        return seed, client.post("/generate", json={"prompt": "red apple", "seed": seed})

    with ThreadPoolExecutor(len(seeds)) as pool:
        answers = list(pool.map(ask, seeds))
    for seed, response in answers:
        assert response.status_code == 200, response.text
        image = response.json()["images"][0]
        assert image["seed"] == seed
        assert png_of(image["data_uri"]) == expected[seed]


def test_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="generate"' in page.text
    assert client.get("/static/app.js").status_code == 200


class RecordingPipeline(GatedPipeline):
    """Answers at once and records the prompts it was asked for."""

    def __init__(self, pipe: Text2Image):
        super().__init__(pipe)
        self.gate.set()
        self.prompts: list[list[str]] = []

    def generate(self, prompts, **kwargs):
        self.prompts.append(list(prompts))
        return super().generate(prompts, **kwargs)


def test_an_unconditional_model_takes_no_prompt(pipe):
    """With an unconditional UNet the prompt field is empty or absent; text is a 422."""
    fake = RecordingPipeline(pipe)
    settings = ServerSettings(max_steps=8, default_steps=2, conditional=False)
    with TestClient(create_app(fake, settings)) as client:
        assert client.get("/config").json()["prompt"]["max_chars"] == 0
        for body in ({}, {"prompt": "", "n": 2}):
            response = client.post("/generate", json=body)
            assert response.status_code == 200, response.text
        for field in ("prompt", "negative_prompt"):
            response = client.post("/generate", json={field: "a red apple"})
            assert response.status_code == 422 and field in response.text
    assert fake.prompts == [[""], ["", ""]]


# ------------------------------------------------------------------------ image-to-image


def image_uri(size=(20, 24), fmt="PNG", seed=0, plain=False) -> str:
    """A random-pixel image (it compresses badly: big files), or a plain one (small files)."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if plain:
        image = Image.new("RGB", size, "red")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_to_image_through_json_is_the_pipelines(client, pipe):
    uri = image_uri()
    body = {"prompt": "red apple", "seed": 8, "steps": 4, "init_image": uri, "strength": 0.5}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["settings"]["strength"] == 0.5 and "init_image" not in payload["settings"]
    png = png_of(payload["images"][0]["data_uri"])
    assert read_png_text(png)["strength"] == "0.5"
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    direct = pipe.generate(["red apple"], seed=8, steps=4, init_image=image, strength=0.5)
    assert png == direct[0].png()
    # Without a strength the server's default applies; text-to-image says no strength.
    response = client.post("/generate", json={**body, "strength": None})
    assert response.json()["settings"]["strength"] == SETTINGS.default_strength
    response = client.post("/generate", json={"prompt": "red apple", "seed": 8})
    assert "strength" not in response.json()["settings"]


def test_config_gives_the_init_image_limits(client):
    body = client.get("/config").json()
    assert body["init_image"] == {
        "max_bytes": 64 * 1024,
        "max_pixels": 256 * 256,
        "types": ["image/png", "image/jpeg", "image/webp"],
    }
    assert body["strength"] == {"min": 0.0, "max": 1.0, "default": 0.6}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"strength": 0.5}, "strength: Value error, applies to image-to-image only"),
        ({"init_image": image_uri(), "strength": 1.5}, "strength:"),
        ({"init_image": image_uri(), "strength": "NaN"}, "strength:"),
        ({"init_image": "data:image/png;base64,%%%"}, "init_image: the init image is not valid"),
        ({"init_image": "data:image/png,rawbytes"}, "init_image: the init image must be a base64"),
        ({"init_image": image_uri(fmt="GIF")}, "init_image: the init image is GIF; give a PNG"),
        ({"init_image": image_uri(fmt="BMP")}, "init_image: the init image is BMP; give a PNG"),
        ({"init_image": image_uri((300, 300), plain=True)}, "the init image is 300x300 ="),
        ({"init_image": image_uri((150, 150))}, "bytes, more than the 65536 allowed"),
        ({"init_image": "data:image/png;base64,"}, "init_image: the init image is empty"),
    ],
)
def test_bad_init_images_get_a_readable_422(client, extra, message):
    response = client.post("/generate", json={"prompt": "x", "steps": 1, **extra})
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


# ------------------------------------------------------------------------ issue 15, item 17


def test_every_returned_seed_is_accepted_back(pipe, monkeypatch):
    from pipeline import server

    fake = RecordingPipeline(pipe)
    with TestClient(create_app(fake, SETTINGS)) as client:
        top = server.MAX_SEED
        response = client.post("/generate", json={"prompt": "a", "seed": top - 2, "n": 3})
        assert response.status_code == 200, response.text
        seeds = [image["seed"] for image in response.json()["images"]]
        assert seeds == [top - 2, top - 1, top]
        for seed in seeds:  # each reported seed is a valid request
            response = client.post("/generate", json={"prompt": "a", "seed": seed})
            assert response.status_code == 200, response.text
        response = client.post("/generate", json={"prompt": "a", "seed": top - 1, "n": 3})
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert detail.startswith("seed:") and f"at most {top}" in detail
        # A seed the server picks leaves room for the last image's.
        monkeypatch.setattr(server.secrets, "randbelow", lambda bound: bound - 1)
        response = client.post("/generate", json={"prompt": "a", "n": 3})
        assert response.status_code == 200, response.text
        assert response.json()["images"][-1]["seed"] == top


def test_only_the_pipelines_settings_errors_are_422s(pipe, caplog):
    from pipeline.text2image import SettingsError

    class Raising(GatedPipeline):
        error: Exception = ValueError("Expected size 4 but got /secret/path shape (3, 7)")

        def generate(self, prompts, **kwargs):
            raise self.error

    fake = Raising(pipe)
    with TestClient(create_app(fake, ServerSettings(default_steps=2))) as client:
        with caplog.at_level("ERROR", logger="pipeline.server"):
            response = client.post("/generate", json={"prompt": "a"})
        assert response.status_code == 500
        detail = response.json()["detail"]
        assert "internal error" in detail and "secret" not in detail and "Expected" not in detail
        assert "/secret/path" in caplog.text  # the detail is in the log
        fake.error = SettingsError("sampler heun needs at least 2 steps")
        response = client.post("/generate", json={"prompt": "a"})
        assert response.status_code == 422
        assert response.json()["detail"] == "sampler heun needs at least 2 steps"


# ------------------------------------------------------------------------ issue 15, item 15


class Fatal(BaseException):
    """Not an Exception: what kills a thread (SystemExit, KeyboardInterrupt, a library's)."""


def test_a_worker_killed_by_a_job_is_restarted_and_counted_in_health(pipe, caplog):
    """Issue 27, item 6 (was issue 15, item 15): a job raising a ``BaseException`` used to
    leave the process up with a dead worker, /health 503 and every request 503 "needs a
    restart". Now that job is a 500, a fresh worker thread serves the next request, and
    /health counts the restart and says why."""

    class DyingOnce(GatedPipeline):
        calls = 0

        def generate(self, prompts, **kwargs):
            DyingOnce.calls += 1
            if DyingOnce.calls == 1:
                raise Fatal("the driver went away (simulated)")
            return self.images * len(prompts)

    app = create_app(DyingOnce(pipe), ServerSettings(default_steps=2, timeout_s=20))
    with TestClient(app) as client:
        health = client.get("/health").json()
        assert health["worker"] == {"alive": True, "restarts": 0, "last_failure": None}
        start = time.monotonic()
        with caplog.at_level("CRITICAL", logger="pipeline.worker"):
            response = client.post("/generate", json={"prompt": "a"})
        assert response.status_code == 500, response.text
        assert time.monotonic() - start < 10  # answered, not left to time out
        assert "internal error" in response.json()["detail"]
        assert "the driver went away" in caplog.text  # the reason is in the log
        later = client.post("/generate", json={"prompt": "a", "seed": 1})
        assert later.status_code == 200, later.text
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        worker = health.json()["worker"]
        assert worker["alive"] is True and worker["restarts"] == 1
        assert "Fatal" in worker["last_failure"]


def test_a_cancelled_job_is_not_logged_as_an_error(pipe, caplog):
    """Issue 27, item 6: a job that stopped because its request timed out set its
    ``Cancelled`` on a future nobody read, and asyncio logged "Future exception was never
    retrieved" with a full traceback at ERROR level."""
    import gc

    slow = SteppingPipeline(pipe)
    app = create_app(slow, ServerSettings(timeout_s=0.3, default_steps=2))
    with caplog.at_level("DEBUG"), TestClient(app) as client:
        assert client.post("/generate", json={"prompt": "a"}).status_code == 504
        assert slow.stopped.wait(5)
        # The worker is free again; by then the cancelled job's future has been settled.
        assert client.post("/generate", json={"prompt": "a", "seed": 0}).status_code == 504
        gc.collect()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# ------------------------------------------------------------------------ issue 15, item 16


def test_generate_needs_a_json_content_type(client):
    body = b'{"prompt": "a", "seed": 1}'
    for headers in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "multipart/form-data"}):
        response = client.post("/generate", content=body, headers=headers)
        assert response.status_code == 415, (headers, response.text)
        assert "application/json" in response.json()["detail"]
    ok = {"Content-Type": "application/json; charset=utf-8"}
    assert client.post("/generate", content=body, headers=ok).status_code == 200


def test_cross_origin_and_foreign_host_requests_are_403s(pipe):
    fake = RecordingPipeline(pipe)
    settings = ServerSettings(default_steps=2, allowed_hosts=("127.0.0.1", "localhost"))
    app = create_app(fake, settings)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        body = {"prompt": "a", "seed": 1}
        same = client.post("/generate", json=body, headers={"Origin": "http://127.0.0.1:8000"})
        assert same.status_code == 200, same.text
        assert client.post("/generate", json=body).status_code == 200  # no Origin: not a browser
        for origin in ("http://evil.example", "http://127.0.0.1:9999", "null"):
            response = client.post("/generate", json=body, headers={"Origin": origin})
            assert response.status_code == 403, origin
            assert "cross-origin" in response.json()["detail"]
        # DNS rebinding: the attacker's name resolves here, Origin and Host agree.
        rebound = {"Host": "evil.example:8000", "Origin": "http://evil.example:8000"}
        response = client.post("/generate", json=body, headers=rebound)
        assert response.status_code == 403 and "Host" in response.json()["detail"]
    assert len(fake.prompts) == 2


def test_a_token_is_required_on_generate_when_set(pipe):
    fake = RecordingPipeline(pipe)
    app = create_app(fake, ServerSettings(default_steps=2, token="s3cret"))
    with TestClient(app) as client:
        body = {"prompt": "a", "seed": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.post("/generate", json=body, headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
            assert "s3cret" not in response.text
        good = client.post("/generate", json=body, headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200, good.text
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    assert "s3cret" not in repr(ServerSettings(token="s3cret"))


def test_binding_beyond_loopback_is_warned_about_and_narrows_host_names():
    from pipeline.server import allowed_host_names, binding_warning

    assert binding_warning("127.0.0.1", None) is None and binding_warning("localhost", None) is None
    loud = binding_warning("0.0.0.0", None)
    assert loud and "WITHOUT A TOKEN" in loud and "MINISD_TOKEN" in loud
    assert "token" in binding_warning("192.168.1.5", "t")
    assert "localhost" in allowed_host_names("127.0.0.1")
    assert allowed_host_names("192.168.1.5", ("box.lan",)) == ("192.168.1.5", "box.lan")
    assert allowed_host_names("0.0.0.0") == ()


# ------------------------------------------------------------------------ issue 15, item 14


class SteppingPipeline(GatedPipeline):
    """Takes ``steps`` sampler steps of ``step_s`` each, asking ``should_stop`` before each."""

    def __init__(self, pipe: Text2Image, step_s: float = 0.05):
        super().__init__(pipe)
        self.step_s, self.taken, self.stopped = step_s, 0, threading.Event()

    def generate(self, prompts, steps=1, should_stop=None, **kwargs):
        from pipeline.text2image import Cancelled

        self.started.set()
        for _ in range(400):
            if should_stop():
                self.stopped.set()
                raise Cancelled("stopped")
            self.taken += 1
            time.sleep(self.step_s)
        return self.images * len(prompts)


def test_work_past_its_deadline_stops_between_steps(pipe):
    slow = SteppingPipeline(pipe)
    app = create_app(slow, ServerSettings(timeout_s=0.3, default_steps=2))
    with TestClient(app) as client:
        response = client.post("/generate", json={"prompt": "a"})
        assert response.status_code == 504
        assert slow.stopped.wait(5)  # the job stopped, it did not run its 400 steps
        assert slow.taken < 100


def test_a_client_that_left_has_its_work_cancelled(pipe, monkeypatch):
    from starlette.requests import Request

    async def gone(self):
        return slow.started.is_set()  # the client hangs up once its job is running

    slow = SteppingPipeline(pipe)
    monkeypatch.setattr(Request, "is_disconnected", gone)
    with TestClient(create_app(slow, ServerSettings(timeout_s=30, default_steps=2))) as client:
        start = time.monotonic()
        client.post("/generate", json={"prompt": "a"})
        assert slow.stopped.wait(5) and time.monotonic() - start < 10
        assert slow.taken < 100


def test_the_real_pipeline_stops_between_sampler_steps(pipe):
    from pipeline.text2image import Cancelled

    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(Cancelled):
        pipe.generate(["a"], seed=0, steps=6, should_stop=should_stop)
    assert len(asked) == 3  # asked before each evaluation, stopped at the third


def test_the_cost_of_one_request_is_capped_with_a_422_that_states_the_cap(pipe):
    fake = RecordingPipeline(pipe)
    settings = ServerSettings(max_steps=8, max_n=3, max_cost=24)
    with TestClient(create_app(fake, settings)) as client:
        assert client.get("/config").json()["max_cost"] == 24
        ok = {"prompt": "a", "n": 3, "steps": 4, "cfg_scale": 5.0}  # 3 x 4 x 2 (CFG) = 24
        assert client.post("/generate", json=ok).status_code == 200
        for over in ({"steps": 5}, {"sampler": "heun"}):  # 30, 48
            response = client.post("/generate", json={**ok, **over})
            assert response.status_code == 422
            assert "cap of 24" in response.json()["detail"]
        unguided = {**ok, "steps": 8, "cfg_scale": 1.0}  # one evaluation a step: 24
        assert client.post("/generate", json=unguided).status_code == 200
    assert len(fake.prompts) == 2

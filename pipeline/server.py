"""HTTP API and web page around a pipeline object: ``create_app(pipeline, settings)``.

    POST /generate   JSON {prompt, negative_prompt, steps, cfg_scale, cfg_interval, seed,
                     sampler, n, format, init_image, strength}
                     -> {"images": [{"data_uri", "seed", "metadata"}], "settings", ...}, or the
                     raw PNG (n = 1) when ``Accept: image/png`` or ``"format": "png"``;
                     ``init_image`` (a base64 data URI of a PNG, JPEG or WebP) turns on
                     image-to-image at ``strength`` in [0, 1]
    GET  /health     worker state (restarts, last failure), device, export hashes, queue
    GET  /config     allowed ranges and defaults (the page reads them)
    GET  /           the web page (static/index.html, plain HTML + JS)

POST /generate must be ``Content-Type: application/json`` (415), same-origin when the browser
sends ``Origin`` and to an allowed Host name (403), and carry ``Authorization: Bearer <token>``
when the server has a token (401). Requests are checked by a pydantic model built from the settings (422 with one readable
``detail`` line; an init image that is too big, of another format, over the pixel cap or
corrupt is a 422 that says which), bodies over ``body_limit`` are refused (413) both by
Content-Length and while streaming, generation runs on one worker thread behind a bounded queue (503 when
full) and each request waits at most ``timeout_s`` (504). A request costing more than
``max_cost`` UNet evaluations (n x steps x evaluations per step) is a 422 that states the cap;
a job whose client left or whose deadline passed is skipped if queued and stops between
sampler steps if running. Same seed, same image.

No ``from __future__ import annotations`` here: FastAPI must resolve the request model,
which is built per app inside ``create_app``.
"""

import asyncio
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from starlette.exceptions import HTTPException

from stages.unet.samplers import SAMPLER_NAMES

from .init_image import FORMATS, InitImageError, InitImageLimits, decode_data_uri, read_init_image
from .png import data_uri
from .text2image import DEFAULT_STRENGTH, Cancelled, Generated, SettingsError
from .worker import QueueFull, Worker, WorkerDead

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MAX_SEED = 2**32 - 1  # image i of a request uses seed + i, so seed + n - 1 must fit too


class Pipeline(Protocol):
    """What the server needs from ``Text2Image`` (tests pass slow or failing stand-ins)."""

    device: Any
    hashes: dict[str, str]
    resolution: int

    def generate(
        self,
        prompts: list[str],
        negative_prompt: str | None,
        seed: int,
        steps: int,
        cfg_scale: float,
        sampler: str,
        shift: float,
        cfg_interval: tuple[float, float],
        init_image: Any = None,
        strength: float | None = None,
        should_stop: Any = None,  # () -> bool, asked between steps; True: raise Cancelled
    ) -> list[Generated]: ...


@dataclass(frozen=True)
class ServerSettings:
    max_prompt_chars: int = 500
    min_steps: int = 1
    max_steps: int = 100
    default_steps: int = 20
    min_cfg_scale: float = 0.0
    max_cfg_scale: float = 20.0
    default_cfg_scale: float = 5.0
    # Flow times [lo, hi] that get guidance; the pipeline's (the export's) default.
    default_cfg_interval: tuple[float, float] = (0.0, 1.0)
    max_n: int = 4
    samplers: tuple[str, ...] = SAMPLER_NAMES
    default_sampler: str = "euler"
    shift: float | None = None  # timestep shift; None: the UNet export's recorded default
    queue_size: int = 8  # jobs waiting behind the running one before 503
    timeout_s: float = 300.0  # per request, queueing included, before 504
    max_cost: int = 800  # UNet evaluations per request: n x steps x evaluations per step
    max_body_bytes: int = 16 * 1024  # without the init image, which adds its own allowance
    conditional: bool = True  # False (an unconditional UNet): the prompt must be empty
    init_image: InitImageLimits = InitImageLimits()
    default_strength: float = DEFAULT_STRENGTH
    token: str | None = field(default=None, repr=False)  # bearer token /generate requires
    allowed_hosts: tuple[str, ...] = ()  # Host names /generate accepts; (): any

    @property
    def max_init_image_chars(self) -> int:
        """The base64 data URI of the largest init image allowed (4 chars per 3 bytes)."""
        return -(-self.init_image.max_bytes // 3) * 4 + 64

    @property
    def body_limit(self) -> int:
        return self.max_body_bytes + self.max_init_image_chars


def request_model(settings: ServerSettings) -> type[BaseModel]:
    """The /generate body, with the ranges of ``settings`` as Field constraints."""
    prompt_text = Annotated[
        str, StringConstraints(strip_whitespace=True, max_length=settings.max_prompt_chars)
    ]

    flow_time = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        if settings.conditional:
            prompt: Annotated[prompt_text, Field(min_length=1)]
            negative_prompt: prompt_text = ""
        else:  # an unconditional model: no text at all
            prompt: Annotated[str, Field(max_length=0)] = ""
            negative_prompt: Annotated[str, Field(max_length=0)] = ""
        steps: int = Field(settings.default_steps, ge=settings.min_steps, le=settings.max_steps)
        cfg_scale: float = Field(
            settings.default_cfg_scale,
            ge=settings.min_cfg_scale,
            le=settings.max_cfg_scale,
            allow_inf_nan=False,
        )
        cfg_interval: tuple[flow_time, flow_time] = settings.default_cfg_interval
        n: int = Field(1, ge=1, le=settings.max_n)  # before seed: its check needs n
        seed: int | None = Field(None, ge=0, le=MAX_SEED)  # None: the server picks one
        sampler: Literal[settings.samplers] = settings.default_sampler  # type: ignore[valid-type]
        format: Literal["json", "png"] = "json"
        init_image: str | None = None  # its size is checked decoded (and by the body limit)
        strength: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)

        @field_validator("seed")
        @classmethod
        def _last_seed_fits(cls, seed: int | None, info: ValidationInfo):
            # The response reports seed + i for image i: each must be a seed accepted back.
            n = info.data.get("n", 1)
            if seed is not None and seed + n - 1 > MAX_SEED:
                raise ValueError(
                    f"image i uses seed + i, so seed + n - 1 must be at most {MAX_SEED} "
                    f"(got seed {seed} with n {n})"
                )
            return seed

        @field_validator("cfg_interval")
        @classmethod
        def _interval_in_order(cls, interval: tuple[float, float]):
            if interval[0] > interval[1]:
                raise ValueError(f"[lo, hi] needs lo <= hi (got [{interval[0]}, {interval[1]}])")
            return interval

        @field_validator("strength")
        @classmethod
        def _strength_needs_an_image(cls, strength: float | None, info: ValidationInfo):
            # init_image is validated first; when it failed, that error is the one to show.
            if strength is not None and info.data.get("init_image", "") is None:
                raise ValueError("applies to image-to-image only: give init_image")
            return strength

    return GenerateRequest


def request_cost(n: int, steps: int, sampler: str, cfg_scale: float, conditional: bool) -> int:
    """At most how many image-sized UNet evaluations a request costs: heun evaluates twice a
    step, classifier-free guidance doubles the batch (not at scale 1 or without text; steps
    outside the guidance interval cost less, which this upper bound ignores)."""
    per_step = (2 if sampler == "heun" else 1) * (2 if conditional and cfg_scale != 1.0 else 1)
    return n * steps * per_step


def config_payload(settings: ServerSettings, pipeline: Pipeline) -> dict[str, Any]:
    return {
        "prompt": {"max_chars": settings.max_prompt_chars if settings.conditional else 0},
        "negative_prompt": {"max_chars": settings.max_prompt_chars},
        "steps": {
            "min": settings.min_steps,
            "max": settings.max_steps,
            "default": settings.default_steps,
        },
        "cfg_scale": {
            "min": settings.min_cfg_scale,
            "max": settings.max_cfg_scale,
            "default": settings.default_cfg_scale,
        },
        "cfg_interval": {"min": 0.0, "max": 1.0, "default": list(settings.default_cfg_interval)},
        "n": {"min": 1, "max": settings.max_n, "default": 1},
        "seed": {"min": 0, "max": MAX_SEED, "default": None},
        "samplers": list(settings.samplers),
        "default_sampler": settings.default_sampler,
        "resolution": pipeline.resolution,
        "timeout_s": settings.timeout_s,
        "max_cost": settings.max_cost,
        "init_image": {
            "max_bytes": settings.init_image.max_bytes,
            "max_pixels": settings.init_image.max_pixels,
            "types": [f"image/{f.lower()}" for f in FORMATS],
        },
        "strength": {"min": 0.0, "max": 1.0, "default": settings.default_strength},
    }


def _error_line(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
    return f"{where}: {error['msg']}" if where else error["msg"]


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, by header and while streaming."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"request body is larger than {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": self._too_large().detail}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside the body read: FastAPI re-raises HTTPExceptions and
                    # Starlette's exception middleware turns it into the 413 response.
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host.lower() in LOOPBACK_NAMES or host.startswith("127.")


def allowed_host_names(bound: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The Host names to accept when bound to ``bound`` (a guard against DNS rebinding): the
    loopback names on loopback, the address itself otherwise, any name on 0.0.0.0 / ::."""
    if bound in ("", "0.0.0.0", "::"):
        return ()
    names = LOOPBACK_NAMES if is_loopback(bound) else (bound.lower(),)
    return names + tuple(e.lower() for e in extra)


def binding_warning(host: str, token: str | None) -> str | None:
    """What to shout when the server listens beyond loopback (None on loopback)."""
    if is_loopback(host):
        return None
    where = f"WARNING: serving on {host}, reachable from other machines"
    if token:
        return f"{where}; /generate needs the bearer token"
    return (
        f"{where} and WITHOUT A TOKEN: anyone who reaches it can use this machine's GPU. "
        "Set --token or MINISD_TOKEN, or bind 127.0.0.1."
    )


class RequestGuard:
    """ASGI middleware for POST /generate, before its body is read: a cross-origin ``Origin``
    or a Host outside ``allowed_hosts`` is a 403, a missing or wrong bearer token (when one is
    set) a 401, a body that is not ``application/json`` a 415 (a form a page on another site
    posts without preflight would otherwise be parsed as JSON)."""

    def __init__(self, app, token: str | None, allowed_hosts: tuple[str, ...]) -> None:
        self.app = app
        self.token = token
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts)

    def refusal(self, headers: dict[str, str]) -> tuple[int, str, dict[str, str]] | None:
        host = headers.get("host", "").lower()
        if self.allowed_hosts and (urlsplit(f"//{host}").hostname or "") not in self.allowed_hosts:
            return 403, f"Host {host!r} is not one this server answers to", {}
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host:
            return 403, f"cross-origin request from {origin!r} refused", {}
        if self.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                given.strip().encode(), self.token.encode()
            ):
                return (
                    401,
                    "this server needs a bearer token: Authorization: Bearer <token>",
                    {"WWW-Authenticate": "Bearer"},
                )
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return 415, f"Content-Type must be application/json (got {media_type!r})", {}
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/generate":
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1")
                for k, v in scope.get("headers") or []
            }
            refused = self.refusal(headers)
            if refused is not None:
                status, detail, extra = refused
                response = JSONResponse({"detail": detail}, status_code=status, headers=extra)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


POLL_S = 0.25  # how often a waiting request looks whether its client is still there


def _run_job(
    pipeline: Pipeline,
    body: BaseModel,
    seed: int,
    shift: float | None,
    img2img: dict[str, Any],
    should_stop: Any,
) -> tuple[list[tuple[bytes, dict[str, str]]], float]:
    """Runs on the worker thread: generate and encode the PNGs (both CPU/GPU bound)."""
    if should_stop():  # its client left or its deadline passed while it waited
        raise Cancelled("cancelled before it started")
    start = time.perf_counter()
    images = pipeline.generate(
        [body.prompt] * body.n,
        negative_prompt=body.negative_prompt or None,
        seed=seed,
        steps=body.steps,
        cfg_scale=body.cfg_scale,
        cfg_interval=tuple(body.cfg_interval),
        sampler=body.sampler,
        shift=shift,
        should_stop=should_stop,
        **img2img,
    )
    return [(g.png(), g.metadata) for g in images], time.perf_counter() - start


def create_app(pipeline: Pipeline, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    worker = Worker(settings.queue_size)
    GenerateRequest = request_model(settings)

    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="minisd", lifespan=lifespan)
    app.state.worker = worker
    app.state.pipeline = pipeline
    app.add_middleware(BodyLimit, max_bytes=settings.body_limit)
    # Added last, so it runs first: refusals cost no body read.
    app.add_middleware(RequestGuard, token=settings.token, allowed_hosts=settings.allowed_hosts)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors()
        ]
        detail = "; ".join(_error_line(e) for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.get("/health")
    async def health() -> JSONResponse:
        # The models sit in memory for the app's whole life; what can fail is the one thread
        # that runs them. A job that ends it gets a fresh one (counted here); only a closed
        # worker (the server stopping) is a 503.
        alive = worker.alive
        payload = {
            "status": "ok" if alive else "worker stopped",
            "models_loaded": alive,
            "worker": {"alive": alive, "restarts": worker.restarts, "last_failure": worker.failure},
            "device": str(pipeline.device),
            "hashes": dict(pipeline.hashes),
            "resolution": pipeline.resolution,
            "queue": {"pending": worker.pending, "capacity": worker.capacity},
        }
        return JSONResponse(payload, status_code=200 if alive else 503)

    @app.get("/config")
    async def config() -> dict[str, Any]:
        return config_payload(settings, pipeline)

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:  # type: ignore[valid-type]
        as_png = body.format == "png" or "image/png" in request.headers.get("accept", "")
        if as_png and body.n != 1:
            return JSONResponse(
                {"detail": f"n: must be 1 when asking for image/png (got {body.n})"},
                status_code=422,
            )
        # A picked seed leaves room for seed + n - 1 (the last image's) within the range.
        cost = request_cost(body.n, body.steps, body.sampler, body.cfg_scale, settings.conditional)
        if cost > settings.max_cost:
            return JSONResponse(
                {
                    "detail": f"n x steps x UNet evaluations per step = {cost}, over this "
                    f"server's cap of {settings.max_cost} per request (heun and CFG each "
                    "evaluate twice a step): ask for fewer images or steps"
                },
                status_code=422,
            )
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 2 - body.n)
        img2img: dict[str, Any] = {}
        if body.init_image is not None:
            try:  # decoding a large image takes a while: off the event loop
                image = await asyncio.to_thread(
                    lambda: read_init_image(decode_data_uri(body.init_image), settings.init_image)
                )
            except InitImageError as err:
                return JSONResponse({"detail": f"init_image: {err}"}, status_code=422)
            strength = settings.default_strength if body.strength is None else body.strength
            img2img = {"init_image": image, "strength": strength}
        deadline = time.monotonic() + settings.timeout_s
        stop = threading.Event()  # set when the client leaves or the deadline passes

        def should_stop() -> bool:
            return stop.is_set() or time.monotonic() > deadline

        try:
            future = worker.submit(
                lambda: _run_job(pipeline, body, seed, settings.shift, img2img, should_stop)
            )
        except QueueFull as err:
            return JSONResponse(
                {"detail": f"server busy: {err}; try again shortly"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        except WorkerDead as err:  # the server is stopping
            return JSONResponse({"detail": str(err)}, status_code=503)
        waiting = asyncio.wrap_future(future)

        def abandon() -> None:
            """Stop the job: one still queued is skipped, a running one stops at its next
            step. ``waiting`` is cancelled too, so the job's ``Cancelled`` is never set on a
            future nobody reads (asyncio would log it as an error)."""
            stop.set()
            future.cancel()
            waiting.cancel()

        timed_out = JSONResponse(
            {"detail": f"generation did not finish within {settings.timeout_s:g} s"},
            status_code=504,
        )
        try:
            while not waiting.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    abandon()
                    return timed_out
                await asyncio.wait({waiting}, timeout=min(remaining, POLL_S))
                if not waiting.done() and await request.is_disconnected():
                    abandon()
                    log.info("client gone: generation cancelled")
                    return Response(status_code=499)  # nobody reads it
            images, elapsed = waiting.result()
        except Cancelled:  # the job saw the deadline pass first
            return timed_out
        except SettingsError as err:  # the pipeline refused the settings: the caller's mistake
            return JSONResponse({"detail": str(err)}, status_code=422)
        except Exception:  # out of memory, a broken export, a ValueError deep in torch...
            # The detail (paths, shapes, memory figures) goes to the log, not to the client.
            log.exception("generation failed")
            return JSONResponse(
                {"detail": "generation failed: internal error (the server log has the detail)"},
                status_code=500,
            )
        if as_png:
            return Response(
                images[0][0],
                media_type="image/png",
                headers={"X-Seed": str(seed), "X-Elapsed-Seconds": f"{elapsed:.3f}"},
            )
        used = body.model_dump(exclude={"format", "init_image", "strength"}) | {"seed": seed}
        if img2img:
            used["strength"] = img2img["strength"]
        return JSONResponse(
            {
                "images": [
                    {"data_uri": data_uri(png), "seed": seed + i, "metadata": metadata}
                    for i, (png, metadata) in enumerate(images)
                ],
                "settings": used,
                "hashes": dict(pipeline.hashes),
                "elapsed_s": round(elapsed, 3),
            }
        )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app

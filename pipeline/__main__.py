"""Command line: ``python -m pipeline generate|interactive|serve|demo|evaluate``.

Thin: parse, build a ``Text2Image`` from ``runs/<preset>/{vae,clip,unet}/export`` (or the
folders given), call it, write PNGs. Sampling defaults come from ``PipelineConfig`` and
``configs/<preset>/sample.toml``; flags override them.

    python -m pipeline generate "red apple" --cfg-scale 7.5 --steps 20 --seed 42 --out out.png
    python -m pipeline generate "red apple" --n 4 --out grid.png      # one grid PNG
    python -m pipeline generate "red apple" --n 4 --numbered --out a.png   # a-000.png ...
    python -m pipeline generate "red apple" --init-image in.png --strength 0.6   # img2img
    python -m pipeline interactive --folder samples
    python -m pipeline serve --host 127.0.0.1 --port 8000
    python -m pipeline demo --out runs/tiny/demo.png
    python -m pipeline evaluate --preset tiny        # each stage's figures, as a table
    python -m pipeline sweep --preset tiny           # quality vs seconds per image
    python -m pipeline export-diffusers --preset tiny out/minisd-tiny   # a diffusers folder
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path

import torch

from stages.common.config import ConfigError, load_config
from stages.common.export import ExportError
from stages.common.interop import MissingExtra
from stages.unet.samplers import SAMPLERS, SamplerConfig, check_cfg_interval

from .compiled import compile_models, warm_up
from .init_image import InitImageError, read_init_image
from .load import ExportFolders
from .png import make_grid, save_png
from .text2image import Generated, PipelineConfig, Text2Image


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--preset", default="tiny", help="runs/<preset>/... and configs/<preset>")
    group.add_argument("--runs", type=Path, default=Path("runs"), help="runs folder")
    for stage in ("vae", "clip", "unet"):
        group.add_argument(
            f"--{stage}", type=Path, help=f"{stage} export folder (default: from --runs/--preset)"
        )
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto")
    group.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="sampling autocast dtype (auto: bf16 on GPUs and on CPUs with native bf16)",
    )
    group.add_argument("--threads", type=int, help="CPU threads (0: one per core)")
    group.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the UNet and VAE decoder (compile time reported apart)",
    )


def _add_sampling_args(parser: argparse.ArgumentParser, with_prompt_options: bool = True) -> None:
    group = parser.add_argument_group("sampling (defaults: configs/<preset>/sample.toml)")
    if with_prompt_options:
        group.add_argument("--negative", default="", help="negative prompt (replaces the null)")
    group.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale")
    group.add_argument("--steps", type=int, help="sampler steps")
    group.add_argument("--seed", type=int, help="seed of the first image (image i: seed + i)")
    group.add_argument("--sampler", choices=sorted(SAMPLERS))
    group.add_argument("--shift", type=float, help="timestep shift (1 = none)")
    group.add_argument("--eta", type=float, help="DDIM noise in [0, 1] (sampler ddim only)")
    group.add_argument(
        "--cfg-interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="flow times [LO, HI] in [0, 1] that get guidance (0 1: every step)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="prompt -> PNG")
    gen.add_argument(
        "prompt", nargs="?", default="", help='omit (or "") for an unconditional model'
    )
    gen.add_argument("--n", type=int, default=1, help="images (seeds seed .. seed + n - 1)")
    gen.add_argument("--out", type=Path, default=Path("out.png"))
    layout = gen.add_mutually_exclusive_group()
    layout.add_argument("--grid", action="store_true", help="with --n > 1: one grid (default)")
    layout.add_argument("--numbered", action="store_true", help="with --n > 1: OUT-000.png ...")
    gen.add_argument(
        "--init-image", type=Path, help="image-to-image: start from this PNG, JPEG or WebP"
    )
    gen.add_argument(
        "--strength",
        type=float,
        help="with --init-image: 0 keeps the image, 1 ignores it (default 0.6)",
    )
    _add_sampling_args(gen)
    _add_model_args(gen)

    loop = commands.add_parser(
        "interactive", help="read prompts (unconditional models: seeds) from stdin, save PNGs"
    )
    loop.add_argument("--folder", type=Path, default=Path("samples"), help="where PNGs go")
    _add_sampling_args(loop)
    _add_model_args(loop)

    serve = commands.add_parser("serve", help="HTTP API and web page")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--queue-size", type=int, default=8, help="waiting requests before 503")
    serve.add_argument("--timeout", type=float, default=300.0, help="seconds per request (504)")
    serve.add_argument(
        "--token",
        default=None,
        help="bearer token POST /generate requires (default: $MINISD_TOKEN; none: no token)",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="another Host name to answer to (besides the bound address); repeatable",
    )
    _add_sampling_args(serve, with_prompt_options=False)
    _add_model_args(serve)

    demo = commands.add_parser("demo", help="a grid PNG for a few fixed emoji prompts")
    demo.add_argument("--out", type=Path, default=Path("demo.png"))
    demo.add_argument("--per-prompt", type=int, default=4, help="seeds per prompt")
    _add_sampling_args(demo, with_prompt_options=False)
    _add_model_args(demo)

    ev = commands.add_parser(
        "evaluate", help="measure the VAE, CLIP and text-to-image exports (pipeline/evaluate.py)"
    )
    ev.add_argument("--data", type=Path, help="data folder (default: the UNet export's)")
    ev.add_argument(
        "--stages", default="vae,clip,unet", help="comma-separated subset of vae,clip,unet"
    )
    ev.add_argument("--num-images", type=int, default=128, help="images per prompt set")
    ev.add_argument("--probe-seeds", type=int, default=4, help="images per probe prompt")
    _add_sampling_args(ev, with_prompt_options=False)
    _add_model_args(ev)

    sweep = commands.add_parser(
        "sweep",
        help="quality vs seconds per image over steps x shift x sampler x guidance interval "
        "(pipeline/sweep.py); the sampling flags set the reference (default: the defaults)",
    )
    sweep.add_argument("--data", type=Path, help="data folder (default: the UNet export's)")
    sweep.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="sweep config overrides over configs/<preset>/sweep.toml, e.g. 'steps=[4,8]'",
    )
    _add_sampling_args(sweep, with_prompt_options=False)
    _add_model_args(sweep)
    exp = commands.add_parser(
        "export-diffusers",
        help="write the exports as a diffusers pipeline folder (needs the interop extra)",
    )
    exp.add_argument("out", type=Path, help="the folder to write (must not exist)")
    group = exp.add_argument_group("models")
    group.add_argument("--preset", default="tiny", help="runs/<preset>/... and configs/<preset>")
    group.add_argument("--runs", type=Path, default=Path("runs"), help="runs folder")
    for stage in ("vae", "clip", "unet"):
        group.add_argument(f"--{stage}", type=Path, help=f"{stage} export folder")
    return parser


def sample_config(args: argparse.Namespace) -> PipelineConfig:
    """Preset defaults with the flags given on top."""
    config = load_config(PipelineConfig, args.preset, "sample")
    flags = {
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "sampler": args.sampler,
        "shift": args.shift,
        "eta": args.eta,
        "cfg_interval": tuple(args.cfg_interval) if args.cfg_interval else None,
        "seed": args.seed,
        "device": args.device,
        "precision": args.precision,
        "threads": args.threads,
        "compile": args.compile,
    }
    config = dataclasses.replace(config, **{k: v for k, v in flags.items() if v is not None})
    if config.cfg_interval is not None:  # refused before any model is loaded
        check_cfg_interval(config.cfg_interval)
    return config


def export_folders(args: argparse.Namespace) -> ExportFolders:
    default = ExportFolders.from_runs(args.runs, args.preset)
    return ExportFolders(
        vae=args.vae or default.vae, clip=args.clip or default.clip, unet=args.unet or default.unet
    )


def load_pipeline(args: argparse.Namespace) -> tuple[Text2Image, PipelineConfig, SamplerConfig]:
    """The pipeline, the pipeline config, and the sampling settings resolved against the
    defaults recorded in the UNet export."""
    config = sample_config(args)
    if config.threads < 0:
        raise ValueError(f"threads must be 0 (one per core) or more, got {config.threads}")
    if config.threads:
        torch.set_num_threads(config.threads)
    pipe = Text2Image.from_exports(export_folders(args), config.device, config.precision)
    if config.compile:
        compile_models(pipe.models)
    return pipe, config, config.sampling(pipe.defaults)


def _generate(
    pipe: Text2Image,
    sampling: SamplerConfig,
    seed: int,
    prompts: list[str],
    negative: str,
    **img2img,
) -> list[Generated]:
    return pipe.generate(
        prompts,
        negative_prompt=negative or None,
        seed=seed,
        steps=sampling.steps,
        cfg_scale=sampling.cfg_scale,
        sampler=sampling.sampler,
        shift=sampling.shift,
        eta=sampling.eta,
        cfg_interval=sampling.cfg_interval,
        **img2img,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    img2img = {}
    if args.init_image is not None:
        try:
            data = args.init_image.read_bytes()
        except OSError as err:
            raise ValueError(f"--init-image: cannot read {args.init_image}: {err}") from None
        try:
            image = read_init_image(data)
        except InitImageError as err:
            raise ValueError(f"--init-image {args.init_image}: {err}") from None
        img2img = {"init_image": image, "strength": args.strength}
    elif args.strength is not None:
        raise ValueError("--strength needs --init-image")
    pipe, config, sampling = load_pipeline(args)
    prompts = [args.prompt] * args.n
    compiled = ""
    if config.compile:  # the same request once, untimed: compilation of every shape it meets
        seconds = warm_up(
            lambda: _generate(pipe, sampling, config.seed, prompts, args.negative, **img2img)
        )
        compiled = f" (compiled; compile + first run {seconds:.1f} s, not counted)"
    start = time.perf_counter()
    images = _generate(pipe, sampling, config.seed, prompts, args.negative, **img2img)
    per_image = (time.perf_counter() - start) / args.n
    guidance = "unconditional"
    if pipe.conditional:
        lo, hi = sampling.cfg_interval
        guidance = f"CFG {sampling.cfg_scale} at flow times [{lo:g}, {hi:g}]"
    if args.n == 1:
        paths = [save_png(images[0].image, images[0].metadata, args.out)]
    elif args.numbered:
        paths = [
            save_png(g.image, g.metadata, args.out.with_name(f"{args.out.stem}-{i:03d}.png"))
            for i, g in enumerate(images)
        ]
    else:
        metadata = dict(images[0].metadata)
        metadata["seed"] = f"{config.seed}..{config.seed + args.n - 1}"
        metadata["n"] = str(args.n)
        paths = [save_png(make_grid([g.image for g in images]), metadata, args.out)]
    for path in paths:
        print(path)
    print(
        f"{args.n} image(s) at {pipe.resolution} px, {sampling.steps} {sampling.sampler} "
        f"steps, {guidance} on {pipe.device}: {per_image:.3f} s/image{compiled}",
        file=sys.stderr,
    )
    return 0


def next_number(folder: Path) -> int:
    """One past the highest NNNNNN.png already in ``folder`` (never overwrite)."""
    numbers = [int(p.stem) for p in folder.glob("*.png") if re.fullmatch(r"\d{6}", p.stem)]
    return max(numbers, default=-1) + 1


def cmd_interactive(args: argparse.Namespace) -> int:
    """One PNG per line: a prompt, or for an unconditional model a seed."""
    pipe, config, sampling = load_pipeline(args)
    args.folder.mkdir(parents=True, exist_ok=True)
    interactive = sys.stdin.isatty()
    asked = "prompt" if pipe.conditional else "seed"
    while True:
        if interactive:
            print(f"{asked} (empty line ends)> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline().strip()
        if not line:
            return 0
        prompt, seed = line, config.seed
        if not pipe.conditional:
            if not line.lstrip("-").isdigit():
                print(f"this model is unconditional: type a seed, not {line!r}", file=sys.stderr)
                continue
            prompt, seed = "", int(line)
        image = _generate(pipe, sampling, seed, [prompt], args.negative)[0]
        path = save_png(
            image.image, image.metadata, args.folder / f"{next_number(args.folder):06d}.png"
        )
        print(path, flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .server import ServerSettings, allowed_host_names, binding_warning, create_app

    token = args.token or os.environ.get("MINISD_TOKEN") or None
    pipe, config, sampling = load_pipeline(args)
    prompt = "red heart" if pipe.conditional else ""
    settings = ServerSettings(
        default_steps=sampling.steps,
        max_steps=max(100, sampling.steps),  # DDPM's ancestral sampler takes 1000
        conditional=pipe.conditional,
        default_cfg_scale=sampling.cfg_scale,
        default_cfg_interval=sampling.cfg_interval,
        default_sampler=sampling.sampler,
        shift=sampling.shift,
        queue_size=args.queue_size,
        timeout_s=args.timeout,
        # The default request (one image, heun, CFG) always fits under the cost cap.
        max_cost=max(ServerSettings.max_cost, 4 * sampling.steps),
        token=token,
        allowed_hosts=allowed_host_names(args.host, tuple(args.allowed_host)),
    )
    if config.compile:  # compile now (one default image), not in the first client's request
        seconds = warm_up(lambda: _generate(pipe, sampling, config.seed, [prompt], ""))
        print(f"compiled: compile + first image {seconds:.1f} s", file=sys.stderr)
    warning = binding_warning(args.host, token)
    if warning:
        print(f"\n{'!' * 78}\n{warning}\n{'!' * 78}\n", file=sys.stderr)
    print(f"serving on http://{args.host}:{args.port}/ (device {pipe.device})", file=sys.stderr)
    uvicorn.run(create_app(pipe, settings), host=args.host, port=args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import write_demo

    pipe, config, sampling = load_pipeline(args)
    start = time.perf_counter()
    path = write_demo(pipe, sampling, config.seed, args.out, per_prompt=args.per_prompt)
    print(f"demo grid written in {time.perf_counter() - start:.1f} s: {path}")
    return 0


def _trained_data(args: argparse.Namespace, folders: ExportFolders, stage: str):
    """(data folder, resolution): ``--data`` or the one ``stage``'s export was trained on."""
    from stages.common.export import read_config

    export = getattr(folders, stage)
    if not (export / "config.json").exists():
        raise ExportError(f"no {stage} export at {export}: train it with `make {stage}`")
    trained = read_config(export)["data"]
    data = args.data or Path(trained["path"])
    if not (data / "val" / "manifest.json").exists():
        raise ValueError(f"{data} has no val/manifest.json: pass --data <the data folder>")
    return data, int(trained["resolution"])


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import STAGES, EvaluateSettings, evaluate, format_table

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise ValueError(f"--stages takes a subset of {','.join(STAGES)}, got {args.stages!r}")
    if args.num_images < 1 or args.probe_seeds < 1:
        raise ValueError("--num-images and --probe-seeds must be at least 1")
    config = sample_config(args)
    if config.threads < 0:
        raise ValueError(f"threads must be 0 (one per core) or more, got {config.threads}")
    if config.threads:
        torch.set_num_threads(config.threads)
    folders = export_folders(args)
    data, resolution = _trained_data(args, folders, stages[-1])
    settings = EvaluateSettings(
        data=data,
        resolution=resolution,
        num_images=args.num_images,
        probe_seeds=args.probe_seeds,
        seed=config.seed,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        sampler=args.sampler,
        shift=args.shift,
        cfg_interval=config.cfg_interval,
    )
    start = time.perf_counter()
    results = evaluate(folders, settings, stages, device=config.device, precision=config.precision)
    print(format_table(results))
    print(
        f"evaluated in {time.perf_counter() - start:.1f} s; written to <export>/../eval/",
        file=sys.stderr,
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from stages.unet.evaluate import ImageEmbedder

    from .evaluate import EvaluateSettings
    from .sweep import SweepConfig, recommended_toml, run_sweep

    sweep = load_config(SweepConfig, args.preset, "sweep", args.overrides)
    folders = export_folders(args)
    data, resolution = _trained_data(args, folders, "unet")
    pipe, config, reference = load_pipeline(args)
    if pipe.models.clip is None or pipe.models.vae.hash == "identity":
        raise ValueError("pipeline sweep measures latent text-to-image models")
    embedder = ImageEmbedder(pipe.models.clip, pipe.models.vae)
    evaluate = EvaluateSettings(data=data, resolution=resolution, num_images=sweep.num_images)
    out = folders.unet.parent / "sweep"
    start = time.perf_counter()
    record = run_sweep(
        pipe, embedder, evaluate, sweep, reference, out, log=lambda m: print(m, file=sys.stderr)
    )
    print((out / "sweep.md").read_text())
    print(
        f"swept {len(record['results'])} settings in {time.perf_counter() - start:.0f} s; "
        f"written to {out}/ (sweep.md, sweep.json, sweep.png). As defaults:\n"
        f"{recommended_toml(record['chosen']['setting'])}",
        file=sys.stderr,
    )
    return 0


def cmd_export_diffusers(args: argparse.Namespace) -> int:
    from .export_diffusers import export_diffusers

    # The preset's sample.toml over the defaults the UNet export recorded, as `generate`.
    sample = load_config(PipelineConfig, args.preset, "sample")
    start = time.perf_counter()
    out = export_diffusers(export_folders(args), args.out, sample)
    print(f"diffusers pipeline written in {time.perf_counter() - start:.1f} s: {out}")
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "interactive": cmd_interactive,
    "serve": cmd_serve,
    "demo": cmd_demo,
    "evaluate": cmd_evaluate,
    "sweep": cmd_sweep,
    "export-diffusers": cmd_export_diffusers,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ExportError, ConfigError, ValueError, MissingExtra) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

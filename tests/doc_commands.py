"""The shell commands of the documentation, read out of its fenced blocks and checked against
the code without running them (``tests/test_docs.py``).

A fenced block with no language (or ``sh``, ``bash``, ``shell``, ``console``) holds commands,
one a line (``\\`` continues a line, ``#`` starts a comment); a diagram or a file tree is
tagged ``text``, a Python example ``python``. ``<...>`` placeholders become one word. Each
command is checked as what it is:

- ``make TARGET... VAR=value...``: the targets and variables exist and ``make -n`` plans them
  (the Makefile itself is run, against a stand-in virtual environment: nothing installed, no
  stage started); the ``section.key=value`` overrides in ``ARGS`` load into the config of the
  stage each target trains.
- ``python -m stages.<name> ...``: the stage's own ``--dry-run`` (its flags parse, its preset
  and every override load into its config).
- any other ``python -m MODULE ...`` (``pipeline``, ``preprocess``, ``bench.*``, ``stages.vae
  import-diffusers``): the module runs as ``__main__`` until its ``ArgumentParser.parse_args``
  returns, then stops: the flags parse, nothing else runs. A ``--`` followed by a command
  (``bench.cpu_step``) checks that command too; ``accelerate launch`` and ``torchrun`` check
  the module they launch.
- ``pip``, ``mv``, ``cp``, ``cd``: not checked (no project code).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHELL_TAGS = ("", "sh", "bash", "shell", "console")
UNCHECKED = ("pip", "mv", "cp", "cd", "export")
STAGES = ("vae", "clip", "unet")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Command:
    where: str  # "docs/data.md:42"
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def commands(path: Path, text: str | None = None) -> list[Command]:
    """Every command of the shell blocks of one Markdown file."""
    text = path.read_text() if text is None else text
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    found = []
    for block in re.finditer(r"^```([\w-]*)\n(.*?)^```", text, flags=re.M | re.S):
        if block.group(1) not in SHELL_TAGS:
            continue
        first = text[: block.start(2)].count("\n") + 1
        lines = block.group(2).split("\n")
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            i += 1
            line = re.sub(r"<[^<>]*>", "PLACEHOLDER", line)
            words = shlex.split(line, comments=True)
            if words:
                found.append(Command(f"{name}:{first + start}", tuple(words)))
    return found


def all_commands() -> list[Command]:
    return [c for path in documents() for c in commands(path)]


class Parsed(Exception):
    """Raised by the patched ``parse_args``: the command's flags parsed, stop there."""


@contextlib.contextmanager
def stop_after_parsing():
    """The top-level parse calls raise ``Parsed``; a sub-command's parser is called through
    ``parse_known_args``, left alone, so unknown flags still fail at the top."""
    originals = {
        name: getattr(argparse.ArgumentParser, name)
        for name in ("parse_args", "parse_intermixed_args")
    }

    def stop(original):
        def parse_then_stop(self, args=None, namespace=None):
            raise Parsed(original(self, args, namespace))

        return parse_then_stop

    for name, original in originals.items():
        setattr(argparse.ArgumentParser, name, stop(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(argparse.ArgumentParser, name, original)


def _overrides_of(module: str, args: argparse.Namespace) -> str | None:
    """The config overrides a parsed command carries, loaded as the command would."""
    from stages.common.config import ConfigError, load_config

    try:
        if module == "stages.vae":  # import-diffusers
            from stages.vae.stage import VAEStageConfig

            data = [f"data.path={args.data}"] if args.data else []
            load_config(VAEStageConfig, args.preset, "vae", data + list(args.overrides))
        elif module == "pipeline" and args.command == "sweep":
            from pipeline.sweep import SweepConfig

            load_config(SweepConfig, args.preset, "sweep", args.overrides)
    except ConfigError as err:
        return f"config error: {err}"
    return None


def _stage_dry_run(name: str, argv: list[str]) -> str | None:
    from stages.common.cli import run_stage

    if name == "vae":
        from stages.vae.stage import VAEStage as Stage
        from stages.vae.stage import VAEStageConfig as Config
    elif name == "clip":
        from stages.clip.stage import CLIPStage as Stage
        from stages.clip.stage import CLIPStageConfig as Config
    else:
        from stages.unet.stage import UNetStage as Stage
        from stages.unet.stage import UNetStageConfig as Config
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = run_stage(name, Config, Stage, [*argv, "--dry-run"])
    except SystemExit as exit_:
        code = exit_.code
    return None if code == 0 else f"exit {code}: {err.getvalue().strip()}"


def _parse_module(module: str, argv: list[str]) -> str | None:
    """Run ``module`` as ``python -m`` would, up to its argument parsing."""
    err = io.StringIO()
    saved = sys.argv
    sys.argv = [module, *argv]
    try:
        with stop_after_parsing(), contextlib.redirect_stdout(io.StringIO()):
            with contextlib.redirect_stderr(err), warnings.catch_warnings():
                # Another test imported ``pipeline.__main__`` already: harmless here.
                warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                runpy.run_module(module, run_name="__main__", alter_sys=False)
    except Parsed as parsed:
        return _overrides_of(module, parsed.args[0])
    except SystemExit as exit_:
        if exit_.code in (0, None) and "--help" in argv:
            return None
        return f"exit {exit_.code}: {err.getvalue().strip()}"
    except ImportError as error:
        return f"no module {module}: {error}"
    finally:
        sys.argv = saved
    return f"{module} finished without parsing arguments: nothing to check it against"


def check_python(words: list[str]) -> str | None:
    """``words`` after the interpreter: ``-m MODULE ARGS...``."""
    if words[:1] != ["-m"] or len(words) < 2:
        return f"not a module command: {shlex.join(words)}"
    module, argv = words[1], words[2:]
    if "--" in argv:  # a wrapper of another command (bench.cpu_step)
        cut = argv.index("--")
        inner, argv = argv[cut + 1 :], argv[:cut]
        problem = check(inner)
        if problem:
            return problem
    name = module.removeprefix("stages.")
    if module.startswith("stages.") and name in STAGES and argv[:1] != ["import-diffusers"]:
        return _stage_dry_run(name, argv)
    return _parse_module(module, argv)


def check_args(targets: list[str], preset: str, args: str) -> str | None:
    """``ARGS`` overrides load into the config of the stage each target trains."""
    from stages.common.config import ConfigError, load_config
    from stages.unet.stage import UNetStageConfig

    configs = {"unet": UNetStageConfig}
    if any(t in ("vae", "clip") for t in targets):
        from stages.clip.stage import CLIPStageConfig
        from stages.vae.stage import VAEStageConfig

        configs |= {"vae": VAEStageConfig, "clip": CLIPStageConfig}
    for target in targets:
        stage = target if target in configs else "unet"
        try:
            load_config(configs[stage], preset, stage, shlex.split(args))
        except ConfigError as err:
            return f"ARGS for {stage}: {err}"
    return None


def makefile_variables() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Z_]+)\s*[?:]?=", text, flags=re.M))


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", text, flags=re.M)
    return set(phony.group(1).split()) if phony else set()


def check_make(words: list[str], venv: Path, runs: Path) -> str | None:
    """``words`` after ``make``."""
    assignments = dict(w.split("=", 1) for w in words if "=" in w)
    targets = [w for w in words if "=" not in w]
    unknown = [t for t in targets if t not in makefile_targets()]
    unknown += [v for v in assignments if v not in makefile_variables()]
    if unknown:
        return f"not in the Makefile: {', '.join(unknown)}"
    if assignments.get("ARGS"):
        problem = check_args(targets, assignments.get("PRESET", "tiny"), assignments["ARGS"])
        if problem:
            return problem
    extra = [f"VENV={venv}", f"RUNS={runs}"]
    data = assignments.get("DATA", "")
    if data and "://" not in data and not data.endswith(".txt") and "/emoji-" not in data:
        extra.append("DATA_DEP=")  # the reader's own folder: nothing here to build it from
    result = subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory", "-n", *words, *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        return f"make -n failed: {result.stderr.strip()}"
    return None


def check(words: list[str], venv: Path | None = None, runs: Path | None = None) -> str | None:
    """None when the command checks out, else what is wrong with it."""
    words = list(words)
    while words and (ENV_ASSIGNMENT.match(words[0]) or words[0] in ("env", "nice", "sudo")):
        words = words[3:] if words[0] == "nice" and words[1:2] == ["-n"] else words[1:]
    if not words:
        return "no command"
    program = words[0]
    if program == "make":
        if venv is None or runs is None:
            return "make commands need a stand-in venv"
        return check_make(words[1:], venv, runs)
    if program in ("python", "python3") or program.endswith("/bin/python"):
        return check_python(words[1:])
    if program in ("accelerate", "torchrun"):
        if "-m" not in words:
            return f"{program}: no -m MODULE"
        return check_python(words[words.index("-m") :])
    if program in UNCHECKED:
        return None
    return f"not a command this test knows ({program}): tag the block `text` if it is not one"

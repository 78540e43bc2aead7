"""The documentation against the code: every command of README.md and docs/*.md is checked
without running it (``doc_commands.py``), a command with a wrong flag, key, target or
variable fails, every relative link and image resolves (anchors included), every docs/ page
is reachable from the README, and the config keys the prose names exist."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from doc_commands import REPO, all_commands, check, commands, documents

MAKE = shutil.which("make")
COMMANDS = all_commands()


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> tuple[Path, Path]:
    """A venv whose stamp is up to date (make installs nothing) and whose python is this one,
    shared by the module's make commands so the preset facts are computed once per preset."""
    root = tmp_path_factory.mktemp("make")
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml and the Makefile: no pip
    (venv / ".chromium").touch()  # `make -n test` asks nothing of the browser either
    return venv, root / "runs"


def test_the_readme_stays_short_and_each_docs_page_opens_with_its_question():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
    for page in sorted((REPO / "docs").glob("*.md")):
        lines = [line for line in page.read_text().splitlines() if line.strip()]
        assert lines[0].startswith("# ") and lines[1].startswith("*"), page.name
        assert "?" in " ".join(lines[1:3]), page.name


def test_the_documents_hold_commands_of_every_kind():
    programs = {c.words[0] for c in COMMANDS}
    assert {"make", "python"} <= programs and len(COMMANDS) > 40


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command(command, stand_in):
    if command.words[0] == "make" and MAKE is None:
        pytest.skip("make is not installed")
    assert check(command.words, *stand_in) is None, str(command)


WRONG = """
```
python -m stages.unet --preset tiny --data data/emoji-32 train.max_stepz=10
python -m stages.clip --preset tiny --dta data/emoji-32
python -m pipeline generate "a red apple" --guidance 5
python -m preprocess folder photos/ --out data/mine --size 256
make unet ARGS="objective.knd=flow"
make unet PRESETS=small
make sampel
python -m bench.cpu_step --metrix m.jsonl -- python -m stages.unet --preset tiny
torchrun --nproc_per_node 2 -m stages.unet --preset tiny --runz runs
frobnicate --all
```

```text
make anything   (a diagram: not a command)
```
"""


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_a_wrong_flag_key_target_or_variable_fails(tmp_path, stand_in):
    """One mistake per line, each of a kind a rename would make; the text block is skipped."""
    found = commands(tmp_path / "wrong.md", WRONG)
    assert len(found) == 10
    problems = [check(c.words, *stand_in) for c in found]
    assert all(problems), [str(c) for c, p in zip(found, problems) if not p]
    assert "max_stepz" in problems[0] and "--dta" in problems[1]
    assert "objective.knd" in problems[4] and "PRESETS" in problems[5] and "sampel" in problems[6]


def test_the_same_commands_spelled_right_pass(tmp_path, stand_in):
    right = WRONG.replace("max_stepz", "max_steps").replace("--dta", "--data")
    right = right.replace("--guidance ", "--cfg-scale ").replace("--size ", "--resolutions ")
    right = right.replace("objective.knd", "objective.kind").replace("PRESETS", "PRESET")
    right = right.replace("sampel", "sample").replace("--metrix ", "--metrics ")
    right = right.replace("--runz", "--runs").replace("frobnicate --all", "pip install -e .")
    found = commands(tmp_path / "right.md", right)
    assert [str(c) for c in found if check(c.words, *stand_in)] == []


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    found = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'<img src="([^"]+)"', text)
    return [link for link in found if not re.match(r"^[a-z]+:", link)]


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(path):
    broken = []
    for link in links(path):
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(link)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(link)
    assert broken == []


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [REPO / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen or not page.exists():
            continue
        seen.add(page)
        for link in links(page):
            target = link.partition("#")[0]
            if target.endswith(".md"):
                todo.append((page.parent / target).resolve())
    assert set((REPO / "docs").glob("*.md")) - seen == set()


def test_config_keys_named_in_the_prose_exist():
    """`section.key=value` in running text names a key of some stage's config."""
    from stages.clip.stage import CLIPStageConfig
    from stages.common.config import load_config, to_dict
    from stages.unet.stage import UNetStageConfig
    from stages.vae.stage import VAEStageConfig

    keys = set()
    for name, cls in (
        ("vae", VAEStageConfig),
        ("clip", CLIPStageConfig),
        ("unet", UNetStageConfig),
    ):
        for section, values in to_dict(load_config(cls, "tiny", name, [])).items():
            keys |= {f"{section}.{key}" for key in values} if isinstance(values, dict) else set()
    named = set()
    for path in documents():
        for span in re.findall(r"`([^`\n]+)`", path.read_text()):
            named |= set(re.findall(r"(?:^|[\s\"'])([a-z_]+\.[a-z_0-9]+)=", span))
    assert named and named - keys - {"section.key"} == set()

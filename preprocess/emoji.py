"""The bundled data set: OpenMoji (colour and black line art) and Twemoji, from npm.

``python -m preprocess emoji --out data --resolutions 512 32`` packs ``openmoji@17.0.0`` and
``@twemoji/svg@15.0.0`` into ``data/.cache/npm/`` (``npm.py``), reads the SVGs straight out of
the tarballs, and feeds them through the common build (``build.py``): rendered with resvg at
the largest resolution, downsampled for the others, composited on white. About 4,495
OpenMoji emoji x 2 styles + 3,720 Twemoji files give some 12,700 pairs; the split key is the
emoji's code points, so the three styles of one emoji always land in the same split.
Captions: ``emoji_captions.py``. Every dataset folder gets an ATTRIBUTION.md.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from . import emoji_captions as names
from .build import BuildConfig, DatasetInfo, build_shards
from .npm import fetch_npm_packages
from .report import BuildReport
from .sample import RawSample, make_key

OPENMOJI_SPEC = "openmoji@17.0.0"
TWEMOJI_SPEC = "@twemoji/svg@15.0.0"
OPENMOJI_LICENCE = "CC BY-SA 4.0"
TWEMOJI_LICENCE = "CC-BY 4.0"
MISSING_SVG = "missing_svg"
NO_NAME = "no_name"
TWEMOJI_FILE = re.compile(r"^package/([0-9a-f]+(?:-[0-9a-f]+)*)\.svg$")

LICENCE = f"{OPENMOJI_LICENCE} (keys openmoji-*); {TWEMOJI_LICENCE} (keys twemoji-*)"
ATTRIBUTION = (
    "OpenMoji (openmoji.org, npm openmoji 17.0.0): all emojis designed by OpenMoji, the "
    "open-source emoji and icon project, licence CC BY-SA 4.0. Twemoji (npm @twemoji/svg "
    "15.0.0): graphics copyright Twitter, Inc and other contributors, licence CC-BY 4.0. "
    "Rasterised with resvg, composited on white, resized; captions from Unicode CLDR names "
    "and tags (openmoji.json, the emoji Python package)."
)
ATTRIBUTION_MD = """# Emoji data set: attribution and licence

Images rendered from SVG with resvg, composited on white and resized to {resolution} px;
captions written from the Unicode CLDR names and tags. Each sample's `.json` names its
source package, style, licence and (OpenMoji) author.

- **OpenMoji** 17.0.0 (npm `openmoji`, https://openmoji.org), colour and black line-art
  variants, keys `openmoji-color-*` and `openmoji-black-*`: "All emojis designed by
  OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0"
  (https://creativecommons.org/licenses/by-sa/4.0/). These rendered images are adaptations
  and are shared under the same licence.
- **Twemoji** 15.0.0 (npm `@twemoji/svg`, packaged under MIT by Samuel Kopp), keys
  `twemoji-*`: graphics copyright Twitter, Inc and other contributors, licensed under
  CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/).
- Names: Unicode CLDR annotations via OpenMoji's `openmoji.json` and the `emoji` Python
  package (BSD licence).
"""


def read_tgz(path: Path, prefixes: tuple[str, ...]) -> dict[str, bytes]:
    """Files of an npm tarball whose names start with one of ``prefixes``."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            return {
                m.name: tar.extractfile(m).read()
                for m in tar
                if m.isfile() and m.name.startswith(prefixes)
            }
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable npm tarball: {err}") from err


def openmoji_samples(files: dict[str, bytes], style: str) -> Iterator[RawSample]:
    """``style`` is ``color`` or ``black``: one sample per openmoji.json entry."""
    entries = json.loads(files["package/data/openmoji.json"])
    tags = names.openmoji_tags(entries)
    group = f"openmoji-{style}"
    for entry in entries:
        hexcode = entry["hexcode"]
        points = names.codepoints(hexcode)
        svg = files.get(f"package/{style}/svg/{hexcode}.svg")
        meta = {
            "emoji": entry.get("emoji", ""),
            "codepoints": names.codepoints_key(points),
            "name": entry["annotation"],
            "style": group,
            "package": OPENMOJI_SPEC,
            "licence": OPENMOJI_LICENCE,
            "author": entry.get("openmoji_author", ""),
        }
        yield RawSample(
            key=make_key(f"{group}-{hexcode}"),
            caption=names.caption(entry["annotation"], tags[points], group),
            data=svg,
            kind="svg",
            meta=meta,
            group=group,
            split_key=names.codepoints_key(points),
            skip=None if svg else MISSING_SVG,
        )


def twemoji_samples(files: dict[str, bytes], openmoji: dict[str, bytes]) -> Iterator[RawSample]:
    entries = json.loads(openmoji["package/data/openmoji.json"])
    tags = names.openmoji_tags(entries)
    annotations = {names.codepoints(e["hexcode"]): e["annotation"] for e in entries}
    package_names = names.emoji_package_names()
    for path in sorted(files):
        match = TWEMOJI_FILE.match(path)
        if not match:
            continue
        points = names.codepoints(match.group(1))
        if points in package_names:
            name = names.package_name_as_cldr(package_names[points], points)
        else:
            name = annotations.get(points, "")
        meta = {
            "emoji": "".join(map(chr, points)),
            "codepoints": names.codepoints_key(points),
            "name": name,
            "style": "twemoji",
            "package": TWEMOJI_SPEC,
            "licence": TWEMOJI_LICENCE,
        }
        yield RawSample(
            key=make_key(f"twemoji-{match.group(1)}"),
            caption=names.caption(name, tags.get(points, []), "twemoji") if name else None,
            data=files[path],
            kind="svg",
            meta=meta,
            group="twemoji",
            split_key=names.codepoints_key(points),
            skip=None if name else NO_NAME,
        )


class EmojiSource:
    """Reads both tarballs once; each call streams all samples again, in the same order."""

    def __init__(self, openmoji_tgz: Path, twemoji_tgz: Path):
        self.openmoji = read_tgz(
            openmoji_tgz,
            ("package/data/openmoji.json", "package/color/svg/", "package/black/svg/"),
        )
        if "package/data/openmoji.json" not in self.openmoji:
            raise ValueError(f"{openmoji_tgz} has no package/data/openmoji.json")
        self.twemoji = read_tgz(twemoji_tgz, ("package/",))

    def __call__(self) -> Iterator[RawSample]:
        yield from openmoji_samples(self.openmoji, "color")
        yield from openmoji_samples(self.openmoji, "black")
        yield from twemoji_samples(self.twemoji, self.openmoji)


def build_emoji(
    out_root: Path,
    config: BuildConfig,
    cache_dir: Path | None = None,
    openmoji_tgz: Path | None = None,
    twemoji_tgz: Path | None = None,
) -> BuildReport:
    """Build ``out_root/emoji-<res>/{train,val}`` for every resolution of ``config``."""
    out_root = Path(out_root)
    if openmoji_tgz is None or twemoji_tgz is None:
        fetched = fetch_npm_packages(
            [OPENMOJI_SPEC, TWEMOJI_SPEC], cache_dir or out_root / ".cache" / "npm"
        )
        openmoji_tgz = openmoji_tgz or fetched[0]
        twemoji_tgz = twemoji_tgz or fetched[1]
    outputs = {r: out_root / f"emoji-{r}" for r in config.resolutions}
    for resolution, folder in outputs.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ATTRIBUTION.md").write_text(ATTRIBUTION_MD.format(resolution=resolution))
    info = DatasetInfo(
        source=f"npm {OPENMOJI_SPEC} (colour, black) and {TWEMOJI_SPEC}, rendered with resvg",
        licence=LICENCE,
        attribution=ATTRIBUTION,
    )
    return build_shards(EmojiSource(openmoji_tgz, twemoji_tgz), outputs, config, info)

"""`python -m stages.vae --preset tiny --data data/emoji-32 --runs runs [section.key=value ...]`.

`python -m stages.vae import-diffusers PATH --preset tiny --data data/emoji-32` writes a VAE
export from a diffusers AutoencoderKL instead of training one (stages/vae/importer.py).
"""

import sys

if sys.argv[1:2] == ["import-diffusers"]:
    from .importer import main

    raise SystemExit(main(sys.argv[2:]))

from stages.common.cli import run_stage  # noqa: E402

from .stage import VAEStage, VAEStageConfig  # noqa: E402

raise SystemExit(run_stage("vae", VAEStageConfig, VAEStage))

"""`python -m stages.vae --preset tiny --data data/emoji-32 --runs runs [section.key=value ...]`."""

from stages.common.cli import run_stage

from .stage import VAEConfig, VAEStage

raise SystemExit(run_stage("vae", VAEConfig, VAEStage))

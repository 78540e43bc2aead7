"""``python -m stages.unet --preset tiny --data data/emoji-32 --runs runs [key=value ...]``."""

from stages.common.cli import run_stage

from .stage import UNetStage, UNetStageConfig

raise SystemExit(run_stage("unet", UNetStageConfig, UNetStage))

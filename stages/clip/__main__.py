"""``python -m stages.clip --preset tiny --data data/emoji-32 --runs runs [key=value ...]``."""

from stages.common.cli import run_stage

from .stage import CLIPStage, CLIPStageConfig

raise SystemExit(run_stage("clip", CLIPStageConfig, CLIPStage))

# The user's surface. Every target depends on `setup`, so a fresh clone needs nothing else.
# CFG and STEPS left empty take the preset's sampling defaults (configs/<preset>/sample.toml);
# `make sample N=4` writes a grid of four seeds.
# Stage targets are file targets on their export manifest: `make unet` builds only what is
# missing upstream, and re-running an interrupted target resumes it from its checkpoint.

# `make help` prints the lines that start with two hashes: `## target: what it does` above a
# target, `## VAR: what it sets` above a variable.

## PRESET: configs/<preset>/: tiny, small, base, or a classic one (default tiny)
PRESET ?= tiny
## RUNS: the runs folder; a stage writes runs/<preset>/<stage>/ (default runs)
RUNS   ?= runs
## DATA_ROOT: where `make data` builds data/emoji-<px> (default data)
DATA_ROOT ?= data
## ARGS: config overrides for every stage, "section.key=value ..." (docs/training.md)
ARGS   ?=
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# What the preset needs: EMOJI_RES (its emoji build), PIXEL (a pixel-space UNet: no VAE
# export), UNCOND (an unconditional UNet: no CLIP export), asked of the config loader with
# the same ARGS the stage gets (stages/unet/make_facts.py). Make writes the fragment after
# `setup` and restarts with it; only the goals that use these facts include it.
FACTS := $(VENV)/make-facts/$(PRESET)$(if $(ARGS),-$(word 1,$(shell printf '%s' '$(subst ','"'"',$(ARGS))' | cksum))).mk
ifneq ($(filter data vae clip unet all sample serve demo,$(or $(MAKECMDGOALS),setup)),)
include $(FACTS)
endif

## DATA: shards: a folder, a URL or a .txt list of URLs (default data/emoji-<px>)
DATA   ?= $(DATA_ROOT)/emoji-$(EMOJI_RES)
# DATA may be a URL (s3://, gs://, https://...) or a .txt list of shard URLs: nothing local
# to build or depend on, the stages fetch the shards (docs/data.md, "Remote shards").
REMOTE_DATA := $(or $(findstring ://,$(DATA)),$(filter %.txt,$(DATA)))
DATA_DEP := $(if $(REMOTE_DATA),,$(DATA)/train/manifest.json)
## EVAL_CLIP: CLIP export for an unconditional UNet's FD (default runs/tiny/clip/export)
EVAL_CLIP ?= $(RUNS)/tiny/clip/export
## PROMPT: what `make sample` draws (default "a red apple; flat colour emoji")
PROMPT ?= $(if $(UNCOND),,a red apple; flat colour emoji)
## CFG: guidance scale for `make sample` (empty: configs/<preset>/sample.toml's)
CFG    ?=
## STEPS: sampler steps for `make sample` (empty: the preset's)
STEPS  ?=
## SEED: the first image's seed; image i has SEED + i (default 42)
SEED   ?= 42
## N: images for `make sample`, one grid (empty: one image)
N      ?=
## OUT: the PNG `make sample` writes (default out.png)
OUT    ?= out.png
## PORT: where `make serve` listens on 127.0.0.1 (default 8000)
PORT   ?= 8000
EXPORT  = $(RUNS)/$(PRESET)/$(1)/export/manifest.json

.PHONY: help setup data vae clip unet all sample serve demo test lint format bench clean-runs

# `make data` fetches the emoji packages with npm (Debian's package, installed once as root,
# like Chromium for `make test`); `make setup` checks for it too, so the demo's first
# command does not fail half way. Without root it prints the command and goes on: tarballs
# already in the npm cache or given by hand need no npm.
define npm_check
	@if ! command -v npm >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; \
		else \
			echo "make data needs npm to fetch the emoji data: sudo apt-get install npm"; \
		fi; \
	fi
endef

## setup: create .venv and install the project with its extras (every target depends on it)
setup: $(STAMP)
	$(npm_check)

## help: this list
help:
	@echo 'make TARGET [VAR=value ...]'
	@echo
	@echo 'targets:'
	@awk '/^## [a-z-]+: /{ i = index($$0, ": "); printf "  %-11s %s\n", substr($$0, 4, i - 4), substr($$0, i + 2) }' $(firstword $(MAKEFILE_LIST))
	@echo
	@echo 'variables:'
	@awk '/^## [A-Z_]+: /{ i = index($$0, ": "); printf "  %-10s %s\n", substr($$0, 4, i - 4), substr($$0, i + 2) }' $(firstword $(MAKEFILE_LIST))

# The registry's default torch build (runs on CPU and GPUs); an empty PIP_FIND_LINKS keeps a
# CPU-only wheel lying on the machine out, since torchvision will not import against it.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	PIP_FIND_LINKS= $(PY) -m pip install --disable-pip-version-check -q -e '.[dev,serve,bench,interop]'
	touch $@

$(FACTS): $(wildcard configs/$(PRESET)/unet.toml stages/unet/*.py) stages/common/data.py | $(STAMP)
	$(PY) -m stages.unet.make_facts --preset $(PRESET) --out $@ $(ARGS)

# `make data` builds the data set of the chosen preset's resolution (32 px for tiny, whose
# build takes well under a minute; 512 px for the others, a few minutes on 2 cores).
## data: build the emoji shards at the preset's resolution (npm, then rendering)
data: $(DATA_DEP)

$(DATA_ROOT)/emoji-%/train/manifest.json: | $(STAMP)
	$(npm_check)
	$(PY) -m preprocess emoji --out $(DATA_ROOT) --resolutions $*

## vae: train the VAE -> runs/<preset>/vae/export/ (resumes an interrupted run)
vae: $(call EXPORT,vae)
## clip: train the text encoder on the VAE's latents -> runs/<preset>/clip/export/
clip: $(call EXPORT,clip)
## unet: train the UNet on the VAE and CLIP exports -> runs/<preset>/unet/export/
unet: $(call EXPORT,unet)
## all: the same as unet: every stage that is missing
all: unet

$(call EXPORT,vae): | $(STAMP) $(DATA_DEP)
	$(PY) -m stages.vae --preset $(PRESET) --data $(DATA) --runs $(RUNS) $(ARGS)

$(call EXPORT,clip): $(call EXPORT,vae) | $(STAMP)
	$(PY) -m stages.clip --preset $(PRESET) --data $(DATA) --runs $(RUNS) $(ARGS)

UNET_DEPS := $(if $(PIXEL),$(DATA_DEP),$(call EXPORT,vae)) \
	$(if $(UNCOND),,$(call EXPORT,clip))
# An unconditional UNet needs no CLIP export; its FD is measured in the tiny preset's CLIP
# image space when that export exists (`make clip PRESET=tiny` first), else it is skipped.
UNET_EVAL := $(if $(UNCOND),$(if $(wildcard $(EVAL_CLIP)/manifest.json),eval.clip_export=$(EVAL_CLIP)))

$(call EXPORT,unet): $(UNET_DEPS) | $(STAMP)
	$(PY) -m stages.unet --preset $(PRESET) --data $(DATA) --runs $(RUNS) $(UNET_EVAL) $(ARGS)

## sample: PROMPT -> OUT (PNG), training what is missing first
sample: $(call EXPORT,unet) | $(STAMP)
	$(PY) -m pipeline generate "$(PROMPT)" --preset $(PRESET) --runs $(RUNS) \
		$(if $(CFG),--cfg-scale $(CFG)) $(if $(STEPS),--steps $(STEPS)) --seed $(SEED) \
		$(if $(N),--n $(N)) --out $(OUT)

## serve: the HTTP API and web page on 127.0.0.1:PORT
serve: $(call EXPORT,unet) | $(STAMP)
	$(PY) -m pipeline serve --preset $(PRESET) --runs $(RUNS) --port $(PORT)

## demo: data, the three stages and the demo grid, runs/<preset>/demo.png
demo: $(call EXPORT,unet) | $(STAMP)
	$(PY) -m pipeline demo --preset $(PRESET) --runs $(RUNS) --out $(RUNS)/$(PRESET)/demo.png

## lint: ruff check and ruff format --check
lint: | $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## format: ruff format and ruff check --fix
format: | $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The web page is tested in a real headless Chromium: Debian's package, installed once.
BROWSER_STAMP := $(VENV)/.chromium
$(BROWSER_STAMP): | $(STAMP)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else \
			echo "the web page test needs Chromium: sudo apt-get install chromium chromium-driver"; exit 1; \
		fi; \
	fi
	touch $@

## test: lint, then the test suite (CPU, a few minutes)
test: lint | $(STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest -q

## bench: ours against diffusers at equal architecture (bench/RESULTS.md)
bench: | $(STAMP)
	$(PY) -m bench

## clean-runs: delete runs/<preset>/ (every stage's checkpoints and exports)
clean-runs:
	rm -rf $(RUNS)/$(PRESET)

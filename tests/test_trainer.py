"""The shared trainer's reliability promises, on the toy stage (tests/toy_stage.py).

Each test states one promise: exact resume after a kill, a preemption signal, a corrupt
newest checkpoint, the mirror, non-finite steps, config changes, a finished run re-run,
8-bit optimizer state, two processes, and the real shard reader.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from toy_stage import ToyConfig, ToyCrash, ToyNet, ToyStage, digest, two_rank_env

from stages.common.checkpoint import CheckpointManager, read_tree
from stages.common.cli import build_parser, run_stage
from stages.common.config import ConfigError, load_config
from stages.common.exits import (
    EXIT_CANNOT_RESUME,
    EXIT_CODES,
    EXIT_DISK_FULL,
    EXIT_ERROR,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
)
from stages.common.files import sha256_file
from stages.common.optim import lr_at
from stages.common.stage import RunContext
from stages.common.trainer import train

TESTS = Path(__file__).parent
REPO = TESTS.parent
STATE_STEMS = ("model.net", "model.critic", "ema", "optimizer", "trainer", "rank0")


def read_metrics(path: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each run here is a new process in real use."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run(runs: Path, *overrides: str) -> tuple[int, ToyStage]:
    config = load_config(ToyConfig, overrides=list(overrides))
    ctx = RunContext(runs, "tiny", "toy")
    stage = ToyStage(config, ctx)
    return train(stage, ctx), stage


def checkpoints(runs: Path) -> dict[int, Path]:
    folder = runs / "tiny" / "toy" / "checkpoints"
    found = folder.iterdir() if folder.exists() else []
    return {int(p.name[5:]): p for p in found if p.name.startswith("step_")}


def final_state(runs: Path) -> dict:
    newest = CheckpointManager(runs / "tiny" / "toy" / "checkpoints").latest()
    return {stem: read_tree(newest.path, stem) for stem in STATE_STEMS}


def assert_bitwise_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}"
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"length differs at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def ids(records: list[dict]) -> list[list]:
    return [r["ids"] for r in records]


def cut_and_resume_over(folder: Path, url: str) -> ToyStage:
    """A 6-step toy run over the shards at ``url``, straight and cut at step 3 then resumed
    by the same command: the resumed run sees exactly the straight one's samples from step
    3 on. Returns the straight run's stage."""
    settings = ("toy.source=shards", f"data.path={url}", "train.max_steps=6")
    settings += (f"data.shard_cache={folder / 'toy-cache'}",)
    code, whole = run(folder / "whole", *settings, "ckpt.every_steps=3")
    assert code == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    assert run(folder / "cut", *settings, "train.max_steps=3")[0] == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    code, resumed = run(folder / "cut", *settings)
    assert code == 0
    assert ids(resumed.seen) == ids(whole.seen)[3:]
    return whole


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 8-step run of the default toy config: state and samples seen."""
    runs = tmp_path_factory.mktemp("reference")
    code, stage = run(runs)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert code == EXIT_OK
    return {"state": final_state(runs), "seen": stage.seen, "runs": runs}


def test_killed_run_resumes_bitwise_equal(tmp_path, reference):
    with pytest.raises(ToyCrash):  # checkpoint at step 4, then killed in step 7
        run(tmp_path, "toy.crash_at_batch=6")
    assert sorted(checkpoints(tmp_path)) == [4]
    first = read_metrics(tmp_path / "tiny/toy/metrics.jsonl")
    assert [m["step"] for m in first if m["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    code, stage = run(tmp_path)
    assert code == EXIT_OK
    assert_bitwise_equal(final_state(tmp_path), reference["state"])
    assert ids(stage.seen) == ids(reference["seen"])[4:]  # no sample missed or repeated
    assert [r["weights"] for r in stage.seen] == [r["weights"] for r in reference["seen"]][4:]
    steps = [m["step"] for m in read_metrics(tmp_path / "tiny/toy/metrics.jsonl")]
    assert steps == list(range(1, 9))  # lines logged after the checkpoint were dropped


def test_compiled_run_matches_eager_and_resumes_from_its_checkpoints(
    tmp_path, reference, monkeypatch
):
    """train.compile=true trains the same model (inductor's own dropout RNG switched to
    eager's, so only float rounding differs) and writes the same checkpoint layout; it is a
    resume-safe key: a compiled run continues an eager one."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    compiled, compile_ = 0, torch.compile

    def counting_compile(model, **kwargs):
        nonlocal compiled
        compiled += 1
        return compile_(model, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    with pytest.raises(ToyCrash):  # eager to the step-4 checkpoint
        run(tmp_path, "toy.crash_at_batch=6")
    AcceleratorState._reset_state(reset_partial_state=True)  # a new process, as in real use
    GradientState._reset_state()
    code, stage = run(tmp_path, "train.compile=true")
    assert compiled == 2  # both trained modules went through torch.compile
    assert code == EXIT_OK
    compiled, eager = final_state(tmp_path), reference["state"]
    for stem in ("model.net", "model.critic", "ema"):
        assert compiled[stem].keys() == eager[stem].keys()  # no "_orig_mod." prefixes
        for key, tensor in eager[stem].items():
            torch.testing.assert_close(compiled[stem][key], tensor, atol=1e-5, rtol=1e-4)
    assert ids(stage.seen) == ids(reference["seen"])[4:]


def test_adamw8bit_with_accumulation_resumes_bitwise_equal(tmp_path):
    settings = ("optim.name=adamw8bit", "toy.width=64", "train.grad_accum=2", "train.max_steps=4")
    code, whole = run(tmp_path / "whole", *settings)
    assert code == EXIT_OK
    state = final_state(tmp_path / "whole")
    hidden = state["optimizer"]["state"]
    assert any(
        s["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8 for s in hidden.values()
    )  # the 64x64 layer holds 8-bit moments
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ToyCrash):  # checkpoint at step 2 (= batch 4), killed in step 4
        run(tmp_path / "cut", *settings, "ckpt.every_steps=2", "toy.crash_at_batch=6")
    AcceleratorState._reset_state(reset_partial_state=True)
    code, resumed = run(tmp_path / "cut", *settings)
    assert code == EXIT_OK
    assert_bitwise_equal(final_state(tmp_path / "cut"), state)
    assert ids(resumed.seen) == ids(whole.seen)[4:]


def test_adamw8bit_accumulation_matches_one_batch_of_twice_the_size(tmp_path, monkeypatch):
    """grad_accum=2 over batches of 4 trains as grad_accum=1 over the same samples in batches
    of 8 (no dropout or input noise, so the two runs draw no different random numbers): one
    8-bit update per two micro-batches, from the mean of their gradients."""
    import toy_stage

    monkeypatch.setattr(torch.nn.Dropout, "forward", lambda self, x: x)
    monkeypatch.setattr(toy_stage.torch, "randn_like", torch.zeros_like)
    settings = ("optim.name=adamw8bit", "toy.width=64", "train.max_steps=4")
    code, _ = run(tmp_path / "accum", *settings, "train.grad_accum=2")
    assert code == EXIT_OK
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    class Pairs(toy_stage.RandomBatches):
        """Batch i is batches 2i and 2i+1 of the accumulating run, concatenated."""

        def __iter__(self):
            halves = super().__iter__()
            while True:
                a, b = next(halves), next(halves)
                yield {k: torch.cat([a[k], b[k]]) for k in ("x", "label", "ids")}

    monkeypatch.setattr(toy_stage, "RandomBatches", Pairs)
    code, _ = run(tmp_path / "whole", *settings, "train.grad_accum=1")
    assert code == EXIT_OK
    accum, whole = final_state(tmp_path / "accum"), final_state(tmp_path / "whole")
    assert accum["trainer"]["step"] == whole["trainer"]["step"] == 4
    for stem in ("model.net", "model.critic"):
        for key, tensor in whole[stem].items():
            torch.testing.assert_close(accum[stem][key], tensor, atol=1e-5, rtol=1e-4)
    for key in ("loss", "grad_norm"):  # the mean over micro-batches, not their sum
        logged = [
            [m[key] for m in read_metrics(tmp_path / name / "tiny/toy/metrics.jsonl")]
            for name in ("accum", "whole")
        ]
        assert len(logged[0]) == 4 and logged[0] == pytest.approx(logged[1], rel=1e-4), key


def start_toy(tmp_path: Path, *overrides: str, lines: int = 2) -> subprocess.Popen:
    """The toy stage in a subprocess (SIGINT at its default, as in a terminal), once
    ``lines`` loss calls are recorded."""
    (tmp_path / "configs" / "tiny").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, str(TESTS / "toy_stage.py"), "--configs", str(tmp_path / "configs")]
    command += ["--runs", str(tmp_path), *overrides]
    process = subprocess.Popen(
        command,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen_file = tmp_path / "tiny/toy/seen.rank0.jsonl"
    deadline = time.monotonic() + 180  # a busy 2-core machine starts torch slowly
    while not (seen_file.exists() and len(seen_file.read_text().splitlines()) >= lines):
        assert process.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.02)
    return process


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name
)
def test_a_stop_signal_saves_at_the_step_boundary_and_resume_matches(tmp_path, reference, sig):
    """SIGTERM (preemption), a first Ctrl-C and SIGHUP (a closed terminal) all save after
    the step they land in and exit 75; the resumed run equals an uninterrupted one."""
    process = start_toy(tmp_path, "toy.sleep=0.25")
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_PREEMPTED, stderr
    assert sig.name in stderr
    seen_file = tmp_path / "tiny/toy/seen.rank0.jsonl"
    done = [json.loads(line) for line in seen_file.read_text().splitlines()]
    assert max(checkpoints(tmp_path)) == len(done) < 8  # saved right after the step it was in
    code, stage = run(tmp_path)
    assert code == EXIT_OK
    assert_bitwise_equal(final_state(tmp_path), reference["state"])
    assert ids(done) + ids(stage.seen) == ids(reference["seen"])


def test_a_second_ctrl_c_exits_130_without_saving(tmp_path):
    """Both Ctrl-Cs land inside the third step (its loss sleeps 1.5 s): no checkpoint."""
    process = start_toy(tmp_path, "toy.sleep=1.5")
    time.sleep(0.3)  # into the third step's loss
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "second SIGINT" in stderr
    assert checkpoints(tmp_path) == {}


def test_wall_clock_saves_without_a_step_trigger(tmp_path, monkeypatch):
    """ckpt.every_minutes=1 with a clock that advances 25 s per step: saves at steps 3 and 6
    (75 s and 150 s), then the final one at 8; every_steps is off."""
    import types

    from stages.common import trainer as trainer_module

    clock = [0.0]
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    config = load_config(
        ToyConfig, overrides=["ckpt.every_steps=0", "ckpt.every_minutes=1", "ckpt.keep_last=5"]
    )
    ctx = RunContext(tmp_path, "tiny", "toy")
    stage = ToyStage(config, ctx)
    loss = stage.loss

    def slow_loss(modules, batch, step):
        clock[0] += 25.0
        return loss(modules, batch, step)

    stage.loss = slow_loss
    assert train(stage, ctx) == EXIT_OK
    assert sorted(checkpoints(tmp_path)) == [3, 6, 8]


def test_gradient_clipping_scales_the_gradient_to_the_max_norm_and_logs_the_norm_before(
    tmp_path,
):
    """The gradient the optimizer applies is the raw one times grad_clip / its norm; the
    logged grad_norm is the raw norm (same seeds, so both runs see the same raw gradient)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    applied: dict[str, list[torch.Tensor]] = {}
    name = ["raw"]

    def record(optimizer, args, kwargs):
        grads = [p.grad.clone() for g in optimizer.param_groups for p in g["params"]]
        applied[name[0]] = grads

    handle = register_optimizer_step_pre_hook(record)
    try:
        code, _ = run(tmp_path / "raw", "train.max_steps=1", "train.grad_clip=0")
        assert code == EXIT_OK
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        name[0] = "clipped"
        code, _ = run(tmp_path / "clipped", "train.max_steps=1", "train.grad_clip=0.01")
        assert code == EXIT_OK
    finally:
        handle.remove()
    raw, clipped = applied["raw"], applied["clipped"]
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in raw])))
    assert norm > 0.1  # clipping to 0.01 does something
    for r, c in zip(raw, clipped, strict=True):
        torch.testing.assert_close(c, r * (0.01 / norm), rtol=1e-4, atol=1e-9)
    for folder in ("raw", "clipped"):
        (logged,) = [
            m["grad_norm"] for m in read_metrics(tmp_path / folder / "tiny/toy/metrics.jsonl")
        ]
        assert logged == pytest.approx(norm, rel=1e-5), folder


def test_an_inherited_ignored_sighup_stays_ignored(tmp_path):
    """Issue 15, item 5: `nohup make unet &` then logging out sends SIGHUP, which nohup set
    to "ignore"; the trainer re-installed its handler over it, saved and stopped with 75."""
    (tmp_path / "configs" / "tiny").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, str(TESTS / "toy_stage.py"), "--configs", str(tmp_path / "configs")]
    command += ["--runs", str(tmp_path), "toy.sleep=0.2", "train.max_steps=5"]
    process = subprocess.Popen(
        command,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # what nohup does
    )
    seen_file = tmp_path / "tiny/toy/seen.rank0.jsonl"
    deadline = time.monotonic() + 180  # a busy 2-core machine starts torch slowly
    while not (seen_file.exists() and len(seen_file.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.02)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_OK, stderr
    assert len(seen_file.read_text().splitlines()) == 5 and max(checkpoints(tmp_path)) == 5


class StopAt:
    """Sends this process SIGTERM when the toy loss reaches step ``step`` (0-based)."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, stage: ToyStage, loss):
        def wrapped(modules, batch, step):
            if step == self.step:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss(modules, batch, step)

        return wrapped


def test_a_stop_at_the_last_step_saves_first_and_one_during_the_final_save_is_kept(
    tmp_path, monkeypatch
):
    """Issue 15, item 6: a stop signal at the last step ran validation and previews before
    the final save; one arriving during the final save (or export) was dropped: exit 0."""
    settings = ("train.val_every=8", "train.preview_every=8", "ckpt.every_steps=0")
    config = load_config(ToyConfig, overrides=list(settings))
    ctx = RunContext(tmp_path / "a", "tiny", "toy")
    stage = ToyStage(config, ctx)
    stage.loss = StopAt(7)(stage, stage.loss)  # the eighth and last step
    assert train(stage, ctx) == EXIT_PREEMPTED
    assert sorted(checkpoints(tmp_path / "a")) == [8]
    metrics = read_metrics(tmp_path / "a/tiny/toy/metrics.jsonl")
    assert not [m for m in metrics if m["split"] == "val"]  # saved before validating
    assert not (tmp_path / "a/tiny/toy/previews").exists()
    AcceleratorState._reset_state(reset_partial_state=True)
    code, again = run(tmp_path / "a", *settings)
    assert code == EXIT_OK and not again.seen and (tmp_path / "a/tiny/toy/export").exists()

    AcceleratorState._reset_state(reset_partial_state=True)
    save = CheckpointManager.save

    def signalled_save(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the grace period starts during the save
        return save(self, *args, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", signalled_save)
    code, _ = run(tmp_path / "b", "ckpt.every_steps=0")
    assert code == EXIT_PREEMPTED and sorted(checkpoints(tmp_path / "b")) == [8]
    assert not (tmp_path / "b/tiny/toy/export").exists()  # exported by the next run


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference, caplog):
    with pytest.raises(ToyCrash):  # checkpoints at steps 2 and 4, killed in step 6
        run(tmp_path, "ckpt.every_steps=2", "toy.crash_at_batch=5")
    newest = checkpoints(tmp_path)[4] / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        code, stage = run(tmp_path)
    assert code == EXIT_OK
    assert "skipping unusable checkpoint" in caplog.text and "step_0000004" in caplog.text
    assert ids(stage.seen) == ids(reference["seen"])[2:]  # resumed from step 2
    assert_bitwise_equal(final_state(tmp_path), reference["state"])


def mirrored_run(mirror: Path) -> Path:
    """The one run folder under the mirror (``<mirror>/tiny/toy/<run id>/``)."""
    (folder,) = (mirror / "tiny" / "toy").iterdir()
    return folder


def test_resume_from_the_mirror_when_the_run_folder_is_gone(tmp_path, reference):
    mirror = tmp_path / "drive"
    with pytest.raises(ToyCrash):
        run(tmp_path / "runs", f"ckpt.mirror='{mirror}'", "toy.crash_at_batch=6")
    folder = mirrored_run(mirror)
    assert (folder / "checkpoints" / "step_0000004" / "manifest.json").exists()
    identity = json.loads((folder / "run.json").read_text())
    assert identity["id"] == folder.name and (folder / "config.json").exists()
    shutil.rmtree(tmp_path / "runs")
    code, stage = run(tmp_path / "runs", f"ckpt.mirror='{mirror}'")
    assert code == EXIT_OK
    assert ids(stage.seen) == ids(reference["seen"])[4:]
    assert_bitwise_equal(final_state(tmp_path / "runs"), reference["state"])
    assert mirrored_run(mirror) == folder  # the fresh folder took the mirrored run's identity
    assert json.loads((tmp_path / "runs/tiny/toy/run.json").read_text()) == identity
    assert (folder / "checkpoints" / "step_0000008" / "manifest.json").exists()


def test_runs_sharing_a_mirror_neither_resume_nor_rotate_each_other(tmp_path, reference):
    """Issue 15, item 1: another runs folder (another LR) on the same Drive folder is
    another run: it starts at step 0, and its keep_last=1 rotation leaves the first run's
    mirrored checkpoints alone, which still resume that run alone."""
    mirror = tmp_path / "drive"
    with pytest.raises(ToyCrash):  # run a: step 4 mirrored, killed in step 7
        run(tmp_path / "a", f"ckpt.mirror='{mirror}'", "toy.crash_at_batch=6")
    code, other = run(
        tmp_path / "b", f"ckpt.mirror='{mirror}'", "optim.lr=5e-3", "ckpt.keep_last=1"
    )
    assert code == EXIT_OK
    assert other.seen[0]["step"] == 0 and len(other.seen) == 8  # trained from scratch
    runs = sorted((mirror / "tiny" / "toy").iterdir())
    assert len(runs) == 2
    assert any((r / "checkpoints" / "step_0000004" / "manifest.json").exists() for r in runs)
    shutil.rmtree(tmp_path / "a")  # a's runtime is gone: it continues from its own copy
    code, stage = run(tmp_path / "a", f"ckpt.mirror='{mirror}'")
    assert code == EXIT_OK
    assert ids(stage.seen) == ids(reference["seen"])[4:]
    assert_bitwise_equal(final_state(tmp_path / "a"), reference["state"])


# Another Colab runtime on the same Drive, reduced to what it does to the mirrored run: it
# holds the run's lease (renewed by a heartbeat) while it trains.
HOLD_MIRROR = """
import sys, time
from stages.common.run import mirror_lease
mirror_lease(sys.argv[1], 300.0)
print("leased", flush=True)
time.sleep(600)
"""


def test_two_live_runtimes_on_one_mirror_the_second_stops(tmp_path, reference, caplog):
    """Issue 27, item 1: two live Colab runtimes see the same runs path and upstream
    exports, so both adopt the same mirrored run, and a local lock does not reach across
    machines. The mirrored run's lease admits one: the second stops (exit 1) with a message
    that says what to do and writes nothing to the mirror; once the holder is killed
    (SIGKILL), a relaunch takes the lease over and resumes from the mirror, bitwise equal."""
    mirror = tmp_path / "drive"
    with pytest.raises(ToyCrash):  # the first runtime trained to step 4, then died
        run(tmp_path / "runs", f"ckpt.mirror='{mirror}'", "toy.crash_at_batch=6")
    folder = mirrored_run(mirror)
    shutil.rmtree(tmp_path / "runs")  # a fresh runtime: empty runs/, the same Drive
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_MIRROR, str(folder)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "leased"
        before = sorted(p.name for p in (folder / "checkpoints").iterdir())
        with caplog.at_level(logging.ERROR):
            code, stage = run(tmp_path / "runs", f"ckpt.mirror='{mirror}'")
        assert code == EXIT_ERROR and not stage.seen  # stopped before the first step
        assert f"in use by another process (PID {holder.pid} on " in caplog.text
        assert "Manage sessions" in caplog.text  # what to do
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == before
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
        holder.wait()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    code, stage = run(tmp_path / "runs", f"ckpt.mirror='{mirror}'")
    assert code == EXIT_OK
    assert ids(stage.seen) == ids(reference["seen"])[4:]
    assert_bitwise_equal(final_state(tmp_path / "runs"), reference["state"])
    assert mirrored_run(mirror) == folder and not (folder / "lease.json").exists()


def test_a_second_process_on_the_run_folder_is_refused_naming_the_holder(tmp_path, capsys):
    """Issue 15, item 3: a second terminal (or a re-run Colab cell) on a busy run folder
    exits at once with the holder's PID and touches nothing; the folder is free again when
    the holder is gone (the kernel drops its lock)."""
    configs = tmp_path / "configs"
    (configs / "tiny").mkdir(parents=True)
    argv = ["--configs", str(configs), "--runs", str(tmp_path), "train.max_steps=2"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "tiny" / "toy")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        code = run_stage("toy", ToyConfig, ToyStage, argv)
        assert code == EXIT_ERROR and time.monotonic() - started < 10
        assert f"PID {holder.pid}" in capsys.readouterr().err
        assert not (tmp_path / "tiny" / "toy").exists()  # no config, no checkpoint written
    finally:
        holder.kill()
        holder.wait()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert run_stage("toy", ToyConfig, ToyStage, argv) == EXIT_OK


def test_exit_codes_are_defined_once_and_the_help_and_readme_state_them_alike():
    """exits.EXIT_CODES is the one definition: --help prints each code with its meaning and
    the table of docs/resume.md lists exactly the same codes and words."""
    help_text = " ".join(build_parser("toy").format_help().split())
    for code, meaning in EXIT_CODES.items():
        assert f" {code} {meaning}" in help_text
    readme = (REPO / "docs" / "resume.md").read_text()
    table = readme[readme.index("Exit codes (defined in `stages/common/exits.py`") :]
    table = table[: table.index("\n\n", table.index("| code |"))]
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", table, flags=re.MULTILINE)
    assert {int(code): meaning for code, meaning in rows} == EXIT_CODES


def test_a_full_disk_stops_the_run_with_its_exit_code_and_loses_nothing(
    tmp_path, reference, monkeypatch, caplog
):
    """Issue 27, item 4: ENOSPC while writing a checkpoint or the export stops the run with
    exit 5 and a message that says "disk full" and how much was needed; the partial folder
    is gone, the previous checkpoint stays, and a re-run with space resumes bitwise equal."""
    import toy_stage

    import stages.common.checkpoint as checkpoint_module

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_write = checkpoint_module.write_tree

    def full_at_step_8(folder, stem, tree):
        if "step_0000008" in folder.name and stem == "optimizer":
            no_space()
        real_write(folder, stem, tree)

    run_dir = tmp_path / "tiny" / "toy"
    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR):
        patch.setattr(checkpoint_module, "write_tree", full_at_step_8)
        code, _ = run(tmp_path)
    assert code == EXIT_DISK_FULL
    assert re.search(
        r"disk full while writing the checkpoint of step 8 .* needs about", caplog.text
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000004"]
    caplog.clear()
    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR):
        patch.setattr(toy_stage, "save_file", no_space)
        code, _ = run(tmp_path)  # resumes at 4, saves 8, then the export finds the disk full
    assert code == EXIT_DISK_FULL and "disk full while writing the toy export" in caplog.text
    assert not (run_dir / "export").exists() and not (run_dir / ".export.tmp").exists()
    code, _ = run(tmp_path)  # space again: only the export was left to do
    assert code == EXIT_OK and (run_dir / "export" / "manifest.json").exists()
    assert_bitwise_equal(final_state(tmp_path), reference["state"])


def test_a_stalled_mirror_does_not_hold_the_run_or_its_final_save(tmp_path, stalled_drive, caplog):
    """Issue 27, item 5: every copy to the mirror blocks (a stalled Drive); the run still
    ends, on time, with its final checkpoint committed locally and the stall reported."""
    stall = stalled_drive
    mirror = tmp_path / "drive"
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING):
            code, _ = run(tmp_path, f"ckpt.mirror='{mirror}'", "ckpt.mirror_timeout_minutes=0.005")
        assert code == EXIT_OK and time.monotonic() - start < 30
    finally:
        stall.set()
    assert "has not finished" in caplog.text
    assert sorted(checkpoints(tmp_path)) == [4, 8]
    assert (tmp_path / "tiny" / "toy" / "export").exists()


# The first process, reduced to what it does to the run folder: the lock beside it.
HOLD_LOCK = """
import fcntl, os, sys, time
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
fd = os.open(os.path.join(os.path.dirname(sys.argv[1]), ".toy.lock"), os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_nan_batch_is_skipped_without_touching_weights_or_schedule(tmp_path):
    code, stage = run(tmp_path, "toy.nan_batches=[2]", "train.max_steps=4")
    assert code == EXIT_OK
    seen = stage.seen
    assert [r["step"] for r in seen] == [0, 1, 2, 2, 3]  # the skip did not advance the step
    assert seen[3]["weights"] == seen[2]["weights"] != seen[1]["weights"]
    state = final_state(tmp_path)
    assert state["trainer"]["skipped_steps"] == 1 and state["trainer"]["step"] == 4
    assert float(state["optimizer"]["state"][0]["step"]) == 4  # four real updates
    lrs = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "tiny/toy/metrics.jsonl")}
    cfg = stage.config.optim
    assert lrs == {s: lr_at(s - 1, cfg, 4) for s in range(1, 5)}


def test_consecutive_non_finite_steps_stop_training(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        code, stage = run(tmp_path, "toy.nan_batches=[1, 2, 3]", "train.max_consecutive_skips=3")
    assert code == EXIT_NONFINITE
    assert "3 non-finite steps in a row" in caplog.text
    assert len(stage.seen) == 4 and not checkpoints(tmp_path)


def test_weights_that_became_non_finite_are_never_saved_nor_exported(tmp_path, caplog):
    """Issue 15, item 7: an update that is not finite while the loss and the gradient were
    (here Adam with eps = 0 on the embedding rows the batch did not use: 0 / 0) used to be
    saved and exported, and every resume then exited 4."""
    with caplog.at_level(logging.ERROR):
        code, stage = run(tmp_path, "optim.eps=0", "train.max_steps=1")
    assert code == EXIT_NONFINITE and len(stage.seen) == 1
    assert not checkpoints(tmp_path) and not (tmp_path / "tiny/toy/export").exists()
    assert "not finite (net.embed.weight, ema.net.embed.weight)" in caplog.text
    assert "not saved" in caplog.text


def test_config_change_is_refused_by_name_and_harmless_changes_resume(tmp_path, caplog):
    with pytest.raises(ToyCrash):
        run(tmp_path, "toy.crash_at_batch=5")
    with caplog.at_level(logging.ERROR):
        code, stage = run(tmp_path, "toy.width=32", "data.batch_size=8", "train.log_every=2")
    assert code == EXIT_CANNOT_RESUME and not stage.seen
    assert "data.batch_size (4 -> 8), toy.width (16 -> 32)" in caplog.text
    assert "train.log_every" not in caplog.text
    code, stage = run(tmp_path, "train.max_steps=10", "train.log_every=5", "ckpt.keep_last=1")
    assert code == EXIT_OK
    assert stage.seen[0]["step"] == 4 and stage.seen[-1]["step"] == 9
    assert max(checkpoints(tmp_path)) == 10


def test_finished_run_rerun_does_nothing_and_reexports_if_needed(tmp_path):
    assert run(tmp_path)[0] == EXIT_OK
    export = tmp_path / "tiny/toy/export/model.safetensors"
    before = {p.name: p.stat().st_mtime_ns for p in checkpoints(tmp_path).values()}
    code, stage = run(tmp_path)
    assert code == EXIT_OK and not stage.seen
    assert {p.name: p.stat().st_mtime_ns for p in checkpoints(tmp_path).values()} == before
    shutil.rmtree(export.parent)
    code, stage = run(tmp_path)
    assert code == EXIT_OK and not stage.seen and export.exists()


def test_best_validation_checkpoint_is_kept_and_trackers_log(tmp_path, caplog):
    trackers = 'train.trackers=["tensorboard", "wandb"]'  # wandb is not installed here
    with caplog.at_level(logging.WARNING):
        code, _ = run(
            tmp_path, "train.val_every=1", "train.preview_every=4", "ckpt.keep_last=1", trackers
        )
    assert code == EXIT_OK
    vals = [m for m in read_metrics(tmp_path / "tiny/toy/metrics.jsonl") if m["split"] == "val"]
    best = min(vals, key=lambda m: m["mse"])["step"]
    assert set(checkpoints(tmp_path)) == {best, 8}
    previews = json.loads((tmp_path / "tiny/toy/previews/toy_0000004.json").read_text())
    assert set(previews) == {"ema", "raw"} and previews["ema"] != previews["raw"]
    assert "'wandb' is not installed" in caplog.text
    assert list((tmp_path / "tiny/toy/logs").rglob("events.out.tfevents.*"))


def test_shard_loader_resumes_exactly_through_the_trainer(tmp_path, tiny_shards):
    settings = ("toy.source=shards", f"data.path='{tiny_shards}'", "train.max_steps=6")
    code, whole = run(tmp_path / "whole", *settings, "ckpt.every_steps=3")
    assert code == EXIT_OK
    AcceleratorState._reset_state(reset_partial_state=True)
    code, _ = run(tmp_path / "cut", *settings, "train.max_steps=3")  # a shorter first run
    assert code == EXIT_OK
    AcceleratorState._reset_state(reset_partial_state=True)
    code, resumed = run(tmp_path / "cut", *settings)  # extended: resumes at step 3
    assert code == EXIT_OK
    assert ids(resumed.seen) == ids(whole.seen)[3:]
    assert len({k for r in whole.seen for k in r["ids"]}) == 24  # 6 batches of 4 distinct keys


def test_two_processes_train_resume_and_agree(tmp_path):
    (tmp_path / "configs" / "tiny").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    base += [str(TESTS / "toy_stage.py"), "--configs", str(tmp_path / "configs")]
    base += ["--runs", str(tmp_path), "ckpt.every_steps=0"]
    for steps in (3, 6):  # the second launch resumes the first's final checkpoint
        done = subprocess.run(
            [*base, f"train.max_steps={steps}"], env=env, capture_output=True, text=True
        )
        assert done.returncode == EXIT_OK, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    seen = {
        rank: [json.loads(x) for x in (tmp_path / f"tiny/toy/seen.rank{rank}.jsonl").open()]
        for rank in (0, 1)
    }
    assert [r["step"] for r in seen[0]] == [r["step"] for r in seen[1]] == list(range(6))
    assert [r["weights"] for r in seen[0]] == [r["weights"] for r in seen[1]]  # in sync
    assert len({i for rank in seen.values() for r in rank for i in r["ids"]}) == 2 * 6 * 4
    final = checkpoints(tmp_path)[6]
    assert (final / "rank0.json").exists() and (final / "rank1.json").exists()
    code, stage = run(tmp_path, "train.max_steps=9")  # one process cannot take over two
    assert code == EXIT_CANNOT_RESUME and not stage.seen


# ------------------------------------------------------------------------- fine-tuning


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def export_net(runs: Path) -> dict[str, torch.Tensor]:
    return load_file(str(runs / "tiny/toy/export/model.safetensors"))


def test_fine_tuning_starts_from_the_exports_weights_with_a_fresh_optimizer(tmp_path, reference):
    export = reference["runs"] / "tiny/toy/export"
    weights = export_net(reference["runs"])
    start = ToyNet(16)
    start.load_state_dict(weights)
    code, stage = run(tmp_path, f"init.from={export}", "train.max_steps=3", "optim.lr=0.003")
    assert code == EXIT_OK
    assert stage.seen[0]["weights"] == digest(start)  # the export's (EMA) weights, not random
    state = final_state(tmp_path)
    assert state["trainer"]["step"] == 3
    assert all(int(s["step"]) == 3 for s in state["optimizer"]["state"].values())  # fresh
    record = {"from": str(export), "hash": sha256_file(export / "model.safetensors")}
    assert state["trainer"]["init"] == record
    assert json.loads((tmp_path / "tiny/toy/init.json").read_text()) == record
    manifest = json.loads((tmp_path / "tiny/toy/export/manifest.json").read_text())
    assert manifest["init"] == record
    # A run without init.from starts from random weights and records nothing.
    assert reference["state"]["trainer"]["init"] is None


def test_fine_tuning_resumes_exactly_and_keeps_what_it_started_from(tmp_path, reference):
    source = tmp_path / "source"
    shutil.copytree(reference["runs"] / "tiny/toy/export", source)
    settings = (f"init.from={source}", "toy.width=16")
    code, _ = run(tmp_path / "whole", *settings)
    assert code == EXIT_OK
    reset_accelerate()
    with pytest.raises(ToyCrash):  # checkpoint at step 4, killed in step 7
        run(tmp_path / "killed", *settings, "toy.crash_at_batch=6")
    reset_accelerate()
    # The export changes after the start: the resumed run neither reads nor records it.
    (source / "model.safetensors").write_bytes(b"not the weights it started from")
    code, _ = run(tmp_path / "killed", *settings)
    assert code == EXIT_OK
    whole, resumed = final_state(tmp_path / "whole"), final_state(tmp_path / "killed")
    assert_bitwise_equal(resumed, whole)
    assert resumed["trainer"]["init"]["hash"] == reference_hash(reference)
    reset_accelerate()
    code, _ = run(tmp_path / "killed", "init.from=elsewhere", "train.max_steps=12")
    assert code == EXIT_CANNOT_RESUME  # what a run started from is part of the run


def reference_hash(reference) -> str:
    return sha256_file(reference["runs"] / "tiny/toy/export/model.safetensors")


def test_freeze_keeps_a_submodule_at_the_exports_weights(tmp_path, reference):
    export = reference["runs"] / "tiny/toy/export"
    weights = export_net(reference["runs"])
    code, _ = run(tmp_path, f"init.from={export}", "init.freeze=['net.hidden']")
    assert code == EXIT_OK
    net = final_state(tmp_path)["model.net"]
    for key in ("hidden.weight", "hidden.bias"):
        assert torch.equal(net[key], weights[key])
    assert not torch.equal(net["inp.weight"], weights["inp.weight"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("init.freeze=['net']",), "needs init.from"),
        (("init.from=EXPORT", "init.freeze=['net.nothing']"), "'net.nothing' names no module"),
        (("init.from=EXPORT", "init.freeze=['net', 'critic']"), "leaves nothing to train"),
    ],
)
def test_bad_freeze_is_a_config_error(tmp_path, reference, overrides, message):
    export = str(reference["runs"] / "tiny/toy/export")
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, *(o.replace("EXPORT", export) for o in overrides))


# Rank 0 of a two-process run whose disk fills up while it writes the shared trees.
FAILING_RANK0 = """
import os, runpy, sys
import stages.common.checkpoint as checkpoint
if os.environ["RANK"] == "0":
    write_tree = checkpoint.write_tree
    def full_disk(folder, stem, tree):
        if stem == "optimizer":
            raise OSError(28, "No space left on device")
        write_tree(folder, stem, tree)
    checkpoint.write_tree = full_disk
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_an_exception_on_rank0_inside_a_save_stops_every_rank_promptly(tmp_path):
    """Issue 15, item 8: the other ranks used to wait at the save's barrier until the
    process group timed out (30 minutes); now every rank raises at the meeting point.
    The ranks are two plain processes, as a cluster scheduler (srun) starts them: no
    launcher kills the survivors when one rank dies."""

    (tmp_path / "configs" / "tiny").mkdir(parents=True)
    launcher = tmp_path / "launch.py"
    launcher.write_text(FAILING_RANK0)
    env = two_rank_env()
    command = [sys.executable, str(launcher), str(TESTS / "toy_stage.py")]
    command += ["--configs", str(tmp_path / "configs"), "--runs", str(tmp_path)]
    command += ["train.max_steps=2", "ckpt.every_steps=1"]
    ranks = [
        subprocess.Popen(
            command,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        errors = [rank.communicate(timeout=240)[1] for rank in ranks]
    except subprocess.TimeoutExpired as err:
        raise AssertionError("a rank still waits for the other after 240 s") from err
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert [rank.returncode != 0 for rank in ranks] == [True, True]
    assert "No space left on device" in errors[0]
    assert "another process failed while saving step 1" in errors[1]
    assert not checkpoints(tmp_path)


def test_the_process_group_timeout_is_a_config_key(tmp_path, monkeypatch):
    """The stage CLI starts the process group (accelerate's PartialState) with
    ``train.pg_timeout_minutes``: long enough for a cache build by default."""
    from datetime import timedelta

    import stages.common.cli as cli

    given = {}

    class Started(Exception):
        pass

    def partial_state(**kwargs):
        given.update(kwargs)
        raise Started

    monkeypatch.setattr(cli, "PartialState", partial_state)
    (tmp_path / "configs" / "tiny").mkdir(parents=True)
    argv = ["--configs", str(tmp_path / "configs"), "--runs", str(tmp_path)]
    with pytest.raises(Started):
        run_stage("toy", ToyConfig, ToyStage, [*argv, "train.pg_timeout_minutes=7"])
    assert given["timeout"] == timedelta(minutes=7)
    with pytest.raises(Started):
        run_stage("toy", ToyConfig, ToyStage, argv)
    assert given["timeout"] == timedelta(minutes=120)

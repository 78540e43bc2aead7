"""The pipeline on tiny real exports: images, seeds, CFG, negative prompts, refusals, CLI."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from exports import PRESET, RESOLUTION, copy_exports, write_vae_export
from PIL import Image

from pipeline import text2image
from pipeline.__main__ import main
from pipeline.demo import write_demo
from pipeline.init_image import InitImageError, InitImageLimits, read_init_image
from pipeline.load import ExportFolders, load_models
from pipeline.png import read_png_text
from pipeline.text2image import Text2Image, resolve_dtype
from stages.common.data import image_tensor
from stages.common.export import ExportError
from stages.common.files import sha256_file
from stages.unet.samplers import SamplerConfig

STEPS = 3
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(generated) -> np.ndarray:
    return np.asarray(generated.image, dtype=np.int16)


def manifest_hash(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["hash"]


# ------------------------------------------------------------------------------- images


def test_images_have_the_exports_size_and_say_how_they_were_made(pipe, tiny_exports):
    out = pipe.generate(
        ["red apple; flat colour emoji", "black heart"], seed=7, steps=STEPS, cfg_scale=4.0
    )
    assert [g.image.size for g in out] == [(RESOLUTION, RESOLUTION)] * 2
    assert all(g.image.mode == "RGB" for g in out)
    assert [g.metadata["seed"] for g in out] == ["7", "8"]
    meta = out[1].metadata
    assert meta["prompt"] == "black heart"
    assert (meta["steps"], meta["cfg_scale"], meta["sampler"]) == (str(STEPS), "4.0", "euler")
    for stage, folder in tiny_exports.items():
        assert meta[f"{stage}_hash"] == manifest_hash(folder)
    assert pixels(out[0]).std() > 0  # not a blank image


def test_same_seed_same_image_whatever_the_batch(pipe):
    batch = pipe.generate(["red apple", "black heart"], seed=11, steps=STEPS)
    alone = pipe.generate(["black heart"], seed=12, steps=STEPS)
    again = pipe.generate(["black heart"], seed=12, steps=STEPS)
    other_seed = pipe.generate(["black heart"], seed=13, steps=STEPS)
    np.testing.assert_array_equal(pixels(batch[1]), pixels(alone[0]))
    np.testing.assert_array_equal(pixels(alone[0]), pixels(again[0]))
    assert np.abs(pixels(alone[0]) - pixels(other_seed[0])).max() > 0


def test_cfg_scale_and_sampler_change_the_image(pipe):
    def run(**kw):
        return pixels(pipe.generate(["red apple"], seed=3, steps=STEPS, **kw)[0])

    low, high = run(cfg_scale=1.0), run(cfg_scale=8.0)
    assert np.abs(low - high).mean() > 0.5
    assert np.abs(run(cfg_scale=4.0, sampler="heun") - run(cfg_scale=4.0)).mean() > 0


def test_negative_prompt_replaces_the_null_condition(pipe):
    def run(prompt, **kw):
        return pixels(pipe.generate([prompt], seed=5, steps=STEPS, **kw)[0])

    plain = run("red apple", cfg_scale=4.0)
    negative = run("red apple", cfg_scale=4.0, negative_prompt="green square")
    assert np.abs(plain - negative).mean() > 0.5
    np.testing.assert_array_equal(plain, run("red apple", cfg_scale=4.0, negative_prompt=""))
    # At scale 0, v = v_u: the negative prompt alone drives the image, exactly as it does
    # when it is the prompt at scale 1 (v = v_c). Equal up to float rounding.
    only_negative = run("red apple", cfg_scale=0.0, negative_prompt="green square")
    as_prompt = run("green square", cfg_scale=1.0)
    assert np.abs(only_negative - as_prompt).max() <= 1


def test_defaults_come_from_the_unet_export(pipe):
    assert pipe.defaults == SamplerConfig()  # the UNet stage's defaults, as exported
    out = pipe.generate(["red apple"], seed=1)
    assert out[0].metadata["steps"] == str(SamplerConfig().steps)


def test_bad_arguments_are_refused(pipe):
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.generate(["x"], sampler="dpm++", steps=2)
    with pytest.raises(ValueError, match="steps"):
        pipe.generate(["x"], steps=0)
    with pytest.raises(ValueError, match="negative prompts"):
        pipe.generate(["x", "y"], negative_prompt=["a", "b", "c"], steps=2)


def test_precision_per_device_and_bf16_sampling_on_cpu(pipe, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(text2image, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(text2image, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32  # emulated bf16 is slower than fp32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("fp32", cpu) == torch.float32
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="fp16 autocast needs a GPU"):
        Text2Image(pipe.models, torch.float16)

    def run(dtype, seed=3):
        out = Text2Image(pipe.models, dtype).generate(["red apple"], seed=seed, steps=STEPS)
        return pixels(out[0])

    fp32, bf16 = run(torch.float32), run(torch.bfloat16)
    rounding = np.abs(fp32 - bf16).mean()
    other_seed = np.abs(fp32 - run(torch.float32, seed=4)).mean()
    assert rounding > 0  # bf16 did run
    assert rounding < 0.1 * other_seed  # and moved the image far less than a new seed does


# ----------------------------------------------------------------------------- refusals


def test_unet_trained_on_another_vae_is_refused_naming_both_hashes(tiny_exports, tmp_path):
    copy = copy_exports(tiny_exports, tmp_path)
    recorded = manifest_hash(tiny_exports.vae)
    torch.manual_seed(123)
    other = write_vae_export(copy.vae)
    assert other != recorded
    with pytest.raises(ExportError) as err:
        load_models(copy)
    assert recorded in str(err.value) and other in str(err.value)
    assert str(copy.vae) in str(err.value)


def test_corrupt_weights_are_refused(tiny_exports, tmp_path):
    copy = copy_exports(tiny_exports, tmp_path)
    weights = copy.unet / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256"):
        load_models(copy)


class _Payload:
    """Unpickling this would write ``marker``: the proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _forge_manifest(folder: Path, name: str) -> None:
    """An attacker who rewrites the file also rewrites its recorded sha256."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][name] = sha256_file(folder / name)
    if name == "model.safetensors":
        manifest["hash"] = manifest["files"][name]
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["pickle", "torch_zip"])
def test_pickle_disguised_as_safetensors_is_refused_unopened(tiny_exports, tmp_path, kind):
    copy = copy_exports(tiny_exports, tmp_path / "runs-copy")
    marker = tmp_path / "unpickled"
    weights = copy.unet / "model.safetensors"
    if kind == "pickle":
        weights.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"x": torch.zeros(2)}, weights)
    _forge_manifest(copy.unet, "model.safetensors")
    with pytest.raises(ExportError, match="not a safetensors file"):
        load_models(copy)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "pytorch_model.bin"])
def test_pickle_file_in_an_export_is_refused(tiny_exports, tmp_path, name):
    copy = copy_exports(tiny_exports, tmp_path)
    marker = tmp_path / "unpickled"
    (copy.vae / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ExportError, match=f"{name} is a pickle-format file"):
        load_models(copy)
    assert not marker.exists()


def test_pickle_file_given_as_export_is_refused(tiny_exports, tmp_path):
    checkpoint = tmp_path / "unet.ckpt"
    checkpoint.write_bytes(pickle.dumps(_Payload(tmp_path / "unpickled")))
    given = ExportFolders(vae=tiny_exports.vae, clip=tiny_exports.clip, unet=checkpoint)
    with pytest.raises(ExportError, match="pickle-format file, not a unet export folder"):
        load_models(given)
    assert not (tmp_path / "unpickled").exists()


def test_missing_export_says_how_to_build_it(tiny_exports, tmp_path):
    # The UNet's manifest says which upstream exports it needs, so it is looked for first.
    with pytest.raises(ExportError, match="make unet"):
        load_models(ExportFolders.from_runs(tmp_path / "empty", PRESET))
    for stage in ("vae", "clip"):
        copy = copy_exports(tiny_exports, tmp_path / stage)
        shutil.rmtree(getattr(copy, stage))
        with pytest.raises(ExportError, match=f"make {stage}"):
            load_models(copy)


# ---------------------------------------------------------------------------------- CLI


def _runs_args(folders: ExportFolders) -> list[str]:
    return ["--runs", str(folders.vae.parents[2]), "--preset", PRESET, "--device", "cpu"]


def test_cli_generate_writes_a_png_with_its_settings(tiny_exports, tmp_path):
    out = tmp_path / "out.png"
    cmd = [sys.executable, "-m", "pipeline", "generate", "red apple; flat colour emoji"]
    cmd += ["--negative", "blue circle", "--cfg-scale", "7.5", "--steps", str(STEPS)]
    cmd += ["--seed", "42", "--sampler", "heun", "--out", str(out), *_runs_args(tiny_exports)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see exports.one_torch_thread
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "s/image" in result.stderr
    text = read_png_text(out)
    assert text["prompt"] == "red apple; flat colour emoji"
    assert text["negative_prompt"] == "blue circle"
    assert (text["seed"], text["steps"], text["cfg_scale"], text["sampler"]) == (
        "42",
        str(STEPS),
        "7.5",
        "heun",
    )
    for stage, folder in tiny_exports.items():
        assert text[f"{stage}_hash"] == manifest_hash(folder)
    assert Image.open(out).size == (RESOLUTION, RESOLUTION)


def test_cli_grid_and_numbered(tiny_exports, tmp_path, capsys):
    common = ["generate", "black heart", "--n", "3", "--steps", "2", "--seed", "9"]
    assert main([*common, "--out", str(tmp_path / "grid.png"), *_runs_args(tiny_exports)]) == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * RESOLUTION + 2, 2 * RESOLUTION + 2)  # 2 x 2 cells, 2 px gaps
    assert read_png_text(tmp_path / "grid.png")["seed"] == "9..11"
    out = tmp_path / "img.png"
    assert main([*common, "--numbered", "--out", str(out), *_runs_args(tiny_exports)]) == 0
    names = sorted(p.name for p in tmp_path.glob("img-*.png"))
    assert names == ["img-000.png", "img-001.png", "img-002.png"]
    assert [read_png_text(tmp_path / n)["seed"] for n in names] == ["9", "10", "11"]


def test_cli_cfg_interval_and_compile_reach_the_image(tiny_exports, tmp_path, capsys, monkeypatch):
    compiled = []

    def fake_compile(module, **kwargs):  # the wiring, not inductor (minutes on a CPU)
        compiled.append((type(getattr(module, "__self__", module)).__name__, kwargs))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    common = ["generate", "black heart", "--steps", "4", "--seed", "9", *_runs_args(tiny_exports)]
    full, limited = tmp_path / "full.png", tmp_path / "limited.png"
    assert main([*common, "--cfg-interval", "0", "1", "--out", str(full)]) == 0
    argv = [*common, "--cfg-interval", "0.3", "0.8", "--compile", "--out", str(limited)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "CFG 5.0 at flow times [0.3, 0.8]" in err and "compile + first run" in err
    assert [name for name, _ in compiled] == ["UNet", "Decoder"]
    assert all(kwargs == {"dynamic": False} for _, kwargs in compiled)
    assert read_png_text(limited)["cfg_interval"] == "0.3,0.8"
    assert read_png_text(full)["cfg_interval"] == "0,1"
    assert Image.open(full).tobytes() != Image.open(limited).tobytes()


def test_cli_reports_a_missing_export(tiny_exports, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    code = main(["generate", "x", "--runs", str(tmp_path), "--preset", PRESET, "--out", out])
    assert code == 2
    assert "make unet" in capsys.readouterr().err
    copy = copy_exports(tiny_exports, tmp_path / "copy")
    shutil.rmtree(copy.vae)
    runs = str(copy.unet.parents[2])
    code = main(["generate", "x", "--runs", runs, "--preset", PRESET, "--out", out])
    assert code == 2
    assert "make vae" in capsys.readouterr().err


def test_interactive_saves_one_png_per_prompt(tiny_exports, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("red apple\nblack heart\n\nignored\n"))
    folder = tmp_path / "samples"
    args = ["interactive", "--folder", str(folder), "--steps", "2", *_runs_args(tiny_exports)]
    assert main(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(folder / "000000.png"), str(folder / "000001.png")]
    assert read_png_text(folder / "000001.png")["prompt"] == "black heart"


def test_demo_grid_has_one_labelled_row_per_prompt(pipe, tmp_path):
    prompts = ("red apple; flat colour emoji", "black heart; flat colour emoji")
    sampling = SamplerConfig(steps=2, cfg_scale=3.0)
    path = write_demo(pipe, sampling, 0, tmp_path / "demo.png", prompts=prompts, per_prompt=3)
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert image.shape[1] > 3 * 128 and image.shape[0] > 2 * 128  # enlarged 16 px cells
    text = read_png_text(path)
    assert text["prompts"] == " | ".join(prompts)
    assert text["steps"] == "2"


# ------------------------------------------------------------------------ image-to-image


def init_image(seed: int = 0, size: int = 24) -> Image.Image:
    """A non-square RGBA picture (resized, cropped and flattened on white by the pipeline)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size + 8, 4), dtype=np.uint8), "RGBA")


def test_strength_0_returns_the_image_through_the_vae(pipe):
    image = init_image()
    out = pipe.generate(["red apple"], seed=3, steps=STEPS, init_image=image, strength=0.0)[0]
    vae = pipe.models.vae
    x = image_tensor(image, RESOLUTION)[None]
    expected = text2image.to_pil(vae.decode(vae.encode(x)[0]))[0]
    assert np.abs(pixels(out) - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert out.metadata["strength"] == "0.0"
    assert len(out.metadata["init_image_sha256"]) == 64


@pytest.mark.parametrize("sampler", ["euler", "ancestral"])
def test_strength_1_is_text_to_image_with_the_same_seed(pipe, sampler):
    kw = {"seed": 4, "steps": STEPS, "sampler": sampler, "cfg_scale": 3.0}
    plain = pipe.generate(["red apple", "black heart"], **kw)
    img2img = pipe.generate(["red apple", "black heart"], init_image=init_image(), strength=1, **kw)
    for a, b in zip(plain, img2img):
        np.testing.assert_array_equal(pixels(a), pixels(b))


def test_intermediate_strength_is_fixed_by_seed_and_image(pipe):
    def run(seed=5, strength=0.5, image=None):
        out = pipe.generate(
            ["red apple"],
            seed=seed,
            steps=4,
            init_image=image or init_image(),
            strength=strength,
            sampler="ancestral",  # stochastic steps: their noise must follow the seed too
        )
        return pixels(out[0])

    first = run()
    np.testing.assert_array_equal(first, run())
    assert np.abs(first - run(seed=6)).max() > 0
    assert np.abs(first - run(image=init_image(1))).max() > 0
    assert np.abs(first - run(strength=0.75)).max() > 0
    assert np.abs(first - run(strength=0.0)).max() > 0


def test_image_to_image_refuses_bad_strength(pipe):
    for strength in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength"):
            pipe.generate(["x"], steps=2, init_image=init_image(), strength=strength)
    with pytest.raises(ValueError, match="init image"):
        pipe.generate(["x"], steps=2, strength=0.5)


def test_read_init_image_checks_format_size_and_pixels():
    def encoded(image: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        return buf.getvalue()

    rgb = init_image().convert("RGB")
    for fmt in ("PNG", "JPEG", "WEBP"):
        assert read_init_image(encoded(rgb, fmt)).size == rgb.size
    with pytest.raises(InitImageError, match="GIF; give a PNG, JPEG or WebP"):
        read_init_image(encoded(rgb, "GIF"))
    with pytest.raises(InitImageError, match="not an image"):
        read_init_image(b"hello, not an image")
    png = encoded(rgb, "PNG")
    with pytest.raises(InitImageError, match="does not decode"):
        read_init_image(png[: len(png) // 2])
    with pytest.raises(InitImageError, match="more than the 100 allowed"):
        read_init_image(png, InitImageLimits(max_bytes=100))
    with pytest.raises(InitImageError, match=r"32x24 = 768 pixels, more than the 700"):
        read_init_image(png, InitImageLimits(max_pixels=700))
    # The pixel cap is read from the header: a 2 MB-pixel black PNG of a few kB is refused.
    big = encoded(Image.new("RGB", (2000, 1000)), "PNG")
    with pytest.raises(InitImageError, match="2000x1000"):
        read_init_image(big, InitImageLimits(max_pixels=1_000_000))


def test_cli_image_to_image(tiny_exports, tmp_path, capsys):
    source = tmp_path / "in.png"
    init_image().save(source)
    out = tmp_path / "out.png"
    common = ["generate", "red apple", "--steps", "4", "--out", str(out), *_runs_args(tiny_exports)]
    assert main([*common, "--init-image", str(source), "--strength", "0.5"]) == 0
    text = read_png_text(out)
    assert text["strength"] == "0.5" and len(text["init_image_sha256"]) == 64
    assert main([*common, "--init-image", str(source)]) == 0
    assert read_png_text(out)["strength"] == "0.6"  # the default
    capsys.readouterr()
    assert main([*common, "--strength", "0.5"]) == 2
    assert "--strength needs --init-image" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"GIF89a not really")
    assert main([*common, "--init-image", str(tmp_path / "bad.png")]) == 2
    assert "bad.png: the init image" in capsys.readouterr().err
    assert main([*common, "--init-image", str(tmp_path / "missing.png")]) == 2
    assert "cannot read" in capsys.readouterr().err

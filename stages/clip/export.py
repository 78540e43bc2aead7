"""The CLIP export: tokenizer, text encoder, image tower, logit scale and null condition.

``<run>/clip/export/`` holds ``model.safetensors`` (``text.*``, ``image.*``,
``logit_scale.*``), ``tokenizer.json`` (trained once, never retrained at load),
``null_condition.safetensors`` (the text encoder output for the empty caption, the one
unconditional input of the UNet in training and at inference), ``config.json`` and
``manifest.json`` (every file's sha256, the towers' shapes, the VAE export it used).
The loader rebuilds the towers from the manifest alone and never unpickles anything.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.common.config import from_dict, to_dict
from stages.common.export import (
    ExportError,
    check_upstream,
    load_tensors,
    read_export,
    read_file,
    write_export,
)

from .loss import LogitScale
from .model import CLIPModelConfig, ImageTower, TextEncoder
from .tokenizer import CLIPTokenizer

TOKENIZER_FILE = "tokenizer.json"
NULL_FILE = "null_condition.safetensors"


@dataclass(frozen=True)
class TextCondition:
    """Text-encoder output: tokens (B, L, D), mask (B, L) bool (True = real), pooled (B, D)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextCondition:
        return TextCondition(
            self.tokens.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype)
        )

    def __getitem__(self, index: Any) -> TextCondition:
        return TextCondition(self.tokens[index], self.mask[index], self.pooled[index])

    def expand(self, batch: int) -> TextCondition:
        """Repeat a batch-1 condition (the null) to ``batch`` rows."""
        if len(self) != 1:
            raise ValueError(f"expand needs a batch-1 condition, got batch {len(self)}")
        return TextCondition(
            self.tokens.expand(batch, -1, -1),
            self.mask.expand(batch, -1),
            self.pooled.expand(batch, -1),
        )

    @staticmethod
    def cat(conditions: list[TextCondition]) -> TextCondition:
        return TextCondition(
            torch.cat([c.tokens for c in conditions]),
            torch.cat([c.mask for c in conditions]),
            torch.cat([c.pooled for c in conditions]),
        )

    def where(self, replace: torch.Tensor, other: TextCondition) -> TextCondition:
        """Rows where ``replace`` (B,) bool is True come from ``other`` (batch B or 1)."""
        return TextCondition(
            torch.where(replace[:, None, None], other.tokens, self.tokens),
            torch.where(replace[:, None], other.mask, self.mask),
            torch.where(replace[:, None], other.pooled, self.pooled),
        )


def build_clip_modules(
    config: CLIPModelConfig,
    vocab_size: int,
    image_channels: int,
    image_size: int,
    logit_scale: LogitScale | None = None,
) -> dict[str, nn.Module]:
    """The trainable CLIP networks by name (the names prefix the exported weights)."""
    return {
        "text": TextEncoder(config.text, vocab_size, config.embed_dim),
        "image": ImageTower(config.image, image_channels, image_size, config.embed_dim),
        "logit_scale": logit_scale if logit_scale is not None else LogitScale(),
    }


@torch.no_grad()
def encode_condition(
    text: TextEncoder, tokenizer: CLIPTokenizer, captions: list[str]
) -> TextCondition:
    device = text.positional_embedding.device
    ids, mask = tokenizer.encode(captions)
    out = text(ids.to(device), mask.to(device))
    return TextCondition(out.tokens, out.mask, out.pooled)


def save_clip_export(
    folder: Path,
    text: TextEncoder,
    image: ImageTower,
    logit_scale: LogitScale,
    tokenizer: CLIPTokenizer,
    config: Any = None,
    vae_hash: str | None = None,
    started_from: dict[str, str] | None = None,
) -> str:
    """Write a CLIP export from (unwrapped, ideally EMA) modules; returns its hash.

    ``config`` is the resolved stage config written as ``config.json`` (defaults to the model
    config); ``vae_hash`` is the VAE export the latent image tower was trained on;
    ``started_from`` the export a fine-tuning run started from (``info["init"]``).
    """
    if text.context_length != tokenizer.context_length:
        raise ValueError(
            f"text encoder context {text.context_length} != tokenizer {tokenizer.context_length}"
        )
    model_config = CLIPModelConfig(
        embed_dim=text.projection.out_features, text=text.config, image=image.config
    )
    was_training = text.training
    text.eval()
    null = encode_condition(text, tokenizer, [""])
    text.train(was_training)
    modules = {"text": text, "image": image, "logit_scale": logit_scale}
    weights = {
        f"{name}.{key}": value
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }
    info = {
        "vocab_size": text.token_embedding.num_embeddings,
        "context_length": text.context_length,
        "width": text.width,
        "embed_dim": model_config.embed_dim,
        "image_input": image.config.input,
        "image_channels": image.in_channels,
        "image_size": image.size,
        "model": to_dict(model_config),
    }
    if started_from is not None:
        info["init"] = dict(started_from)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = Path(tmp) / TOKENIZER_FILE
        tokenizer.save(tokenizer_path)
        return write_export(
            Path(folder),
            "clip",
            weights,
            config if config is not None else model_config,
            info=info,
            upstream={"vae": vae_hash} if vae_hash else {},
            extra_files={TOKENIZER_FILE: tokenizer_path},
            extra_tensors={
                NULL_FILE: {"tokens": null.tokens, "mask": null.mask, "pooled": null.pooled}
            },
        )


class LoadedCLIP:
    """A CLIP export ready for inference (eval mode, no gradients)."""

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        tokenizer: CLIPTokenizer,
        modules: dict[str, nn.Module],
        null: TextCondition,
        device: torch.device,
    ):
        info = manifest["info"]
        self.folder = folder
        self.hash: str = manifest["hash"]
        self.upstream: dict[str, str] = dict(manifest.get("upstream", {}))
        self.width: int = info["width"]
        self.context_length: int = info["context_length"]
        self.embed_dim: int = info["embed_dim"]
        self.image_input: str = info["image_input"]
        self.image_channels: int = info["image_channels"]
        self.image_size: int = info["image_size"]
        self.tokenizer = tokenizer
        self.text: TextEncoder = modules["text"]
        self.image: ImageTower = modules["image"]
        self.logit_scale: LogitScale = modules["logit_scale"]
        self.null = null
        self.device = device

    def encode_text(self, captions: list[str]) -> TextCondition:
        return encode_condition(self.text, self.tokenizer, captions)

    @torch.no_grad()
    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        """(B, E) L2-normalised text embeddings."""
        return F.normalize(self.text.projection(self.encode_text(captions).pooled), dim=-1)

    @torch.no_grad()
    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E) L2-normalised image embeddings of normalised latents or [-1, 1] pixels."""
        return F.normalize(self.image(x.to(self.device, torch.float32)), dim=-1)


def load_clip(
    folder: Path, device: torch.device | str = "cpu", vae_hash: str | None = None
) -> LoadedCLIP:
    """Load and verify a CLIP export; with ``vae_hash`` refuse one trained on another VAE.

    A pixel-input export was trained without the VAE and records no VAE upstream, so only a
    latent-input export is checked against ``vae_hash``.
    """
    folder = Path(folder)
    device = torch.device(device)
    manifest = read_export(folder, "clip")
    info = manifest["info"]
    if vae_hash is not None and info["image_input"] == "latent":
        check_upstream(manifest, "vae", vae_hash, folder)
    try:
        model_config = from_dict(CLIPModelConfig, info["model"])
    except (KeyError, ValueError) as err:
        raise ExportError(f"{folder}/manifest.json: bad CLIP model info: {err}") from err
    tokenizer = CLIPTokenizer.from_json(
        read_file(folder, TOKENIZER_FILE, manifest).decode(),
        info["context_length"],
        where=folder / TOKENIZER_FILE,
    )
    modules = build_clip_modules(
        model_config, info["vocab_size"], info["image_channels"], info["image_size"]
    )
    weights = load_tensors(folder, manifest=manifest)
    for name, module in modules.items():
        prefix = f"{name}."
        part = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(part)
        except RuntimeError as err:
            raise ExportError(
                f"{folder}/model.safetensors does not fit the {name} tower: {err}"
            ) from err
        module.to(device).eval().requires_grad_(False)
    null_tensors = load_tensors(folder, NULL_FILE, manifest)
    null = TextCondition(
        null_tensors["tokens"], null_tensors["mask"].bool(), null_tensors["pooled"]
    ).to(device)
    return LoadedCLIP(folder, manifest, tokenizer, modules, null, device)

"""Our text encoder -> transformers' ``CLIPTextModel``: config and weights.

Both are CLIP's causal pre-LN text transformer; the differences are names and one layout:

    token_embedding, positional_embedding   embeddings.token_embedding, .position_embedding
    blocks.<i>.ln1 / ln2                    encoder.layers.<i>.layer_norm1 / layer_norm2
    blocks.<i>.attn.qkv (3D, D)             self_attn.q_proj, k_proj, v_proj (D, D) each
    blocks.<i>.attn.out                     self_attn.out_proj
    blocks.<i>.mlp.0 / .2                   mlp.fc1 / fc2   (exact GELU: hidden_act "gelu")
    ln_final                                final_layer_norm

``CLIPTextModel`` pools at the first ``eos_token_id`` (our end-of-text id), which is our
end position ``mask.sum() - 1`` since captions cannot contain the special tokens. Two
differences a caller handles: its states at pad positions are not zeroed (multiply by the
mask, as ours does), and with ``eos_token_id == 2`` it falls back to the argmax of the ids,
so such a tokenizer is refused. The projection to the joint space is left out: the UNet
reads the token states and the pooled state only. Nothing here imports transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from stages.common.config import ConfigError

from .model import TextEncoder
from .tokenizer import CLIPTokenizer

_LAYER = {"ln1": "layer_norm1", "ln2": "layer_norm2", "attn.out": "self_attn.out_proj"}
_LAYER |= {"mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}


def clip_text_config_kwargs(text: TextEncoder, tokenizer: CLIPTokenizer) -> dict[str, Any]:
    """CLIPTextConfig arguments equal to ``text`` with ``tokenizer``'s special ids."""
    cfg = text.config
    if tokenizer.end_id == 2:
        raise ConfigError(
            "tokenizer: its end-of-text id is 2, which CLIPTextModel reads as a legacy "
            "checkpoint (pooling at the argmax id); retrain the tokenizer"
        )
    return {
        "vocab_size": text.token_embedding.num_embeddings,
        "hidden_size": cfg.width,
        "intermediate_size": int(cfg.width * cfg.mlp_ratio),
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.context_length,
        "hidden_act": "gelu",
        "layer_norm_eps": text.ln_final.eps,
        "projection_dim": text.projection.out_features,
        "bos_token_id": tokenizer.start_id,
        "eos_token_id": tokenizer.end_id,
        "pad_token_id": tokenizer.pad_id,
    }


def to_transformers(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our TextEncoder state dict -> CLIPTextModel's (``prefix``: "text_model." in
    transformers 4.x, "" in 5.x); the joint-space projection is dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out[f"{prefix}embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out[f"{prefix}embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out[f"{prefix}final_layer_norm.{key.split('.')[-1]}"] = value
        elif key.startswith("blocks."):
            _, index, *rest = key.split(".")
            layer, param = ".".join(rest[:-1]), rest[-1]
            base = f"{prefix}encoder.layers.{index}"
            if layer == "attn.qkv":  # rows [q; k; v], each (D, ...), as our rearrange splits them
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                    out[f"{base}.self_attn.{name}.{param}"] = part.clone()
            else:
                out[f"{base}.{_LAYER[layer]}.{param}"] = value
        elif not key.startswith("projection."):
            raise ValueError(f"unexpected text encoder weight {key}")
    return out

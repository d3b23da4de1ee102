"""The two calls every backend implements; everything above them (tiling, prompts, sampling) is shared."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Decoder(Protocol):
    """A KV-cached language model: prefill once, then one token a step."""

    max_seq: int  # positions the KV cache holds (prompt + generated)

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Start a new sequence from inputs_embeds [N, H] float32; return the last position's logits [V] float32."""

    def decode(self, token_id: int) -> np.ndarray:
        """Append one token to the sequence; return its logits [V] float32."""


class Backend(Decoder, Protocol):
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [T, 3, 448, 448] float32 -> image_embeds [T, 256, H] float32."""

    def embed_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        """token_ids [N] int64 -> embeddings [N, H] float32."""

"""The PyTorch reference backend: our plain modules, eager, KV cache grown by concatenation.

Imported only when backend="torch" is asked for (edgevl.api), so the rest of edgevl runs without torch.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..errors import SettingError
from ..modeling import LanguageModel, Rope, VisionModel

_TORCH_DTYPES = ("float32", "float16", "bfloat16")


def to_tensor(array: np.ndarray, dtype: "torch.dtype") -> "torch.Tensor":
    """numpy (incl. ml_dtypes bfloat16, which torch cannot read directly) -> torch; a read-only array (a memory
    map) is copied, a checkpoint's `Weights` read is fresh already and used as it is."""
    if not array.flags.writeable:
        array = np.array(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).to(dtype)
    return torch.from_numpy(array).to(dtype)


def load_vision(checkpoint: Checkpoint, dtype: "torch.dtype") -> VisionModel:
    """The vision tower and projector alone, weights converted to `dtype` (the exporter holds one part at a time)."""
    with torch.device("meta"):  # no random init of weights that are replaced right away
        vision = VisionModel(checkpoint.spec)
    _assign(vision, checkpoint, dtype, lambda name: not name.startswith("decoder."), "")
    return vision


def load_language_model(checkpoint: Checkpoint, dtype: "torch.dtype") -> LanguageModel:
    with torch.device("meta"):
        lm = LanguageModel(checkpoint.spec.decoder)
    lm.rope = Rope(checkpoint.spec.decoder)  # computed tables, not weights: build them for real
    _assign(lm, checkpoint, dtype, lambda name: name.startswith("decoder."), "decoder.")
    return lm


def _assign(module, checkpoint: Checkpoint, dtype, wanted, prefix: str) -> None:
    state = {name[len(prefix):]: to_tensor(w, dtype) for name, w in checkpoint.weights.items() if wanted(name)}
    module.load_state_dict(state, strict=True, assign=True)


class TorchBackend:
    def __init__(self, checkpoint: Checkpoint, device: str = "cpu", dtype: str = "float32",
                 max_seq: int | None = None):
        if dtype not in _TORCH_DTYPES:
            raise SettingError("", "dtype", dtype, f"expected one of {_TORCH_DTYPES}")
        spec = checkpoint.spec
        try:
            self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        except RuntimeError as e:
            raise SettingError("", "device", device, f"not a torch device ({e})") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SettingError("", "device", device, f"this PyTorch ({torch.__version__}) sees no CUDA GPU (a CPU "
                               "build, or no driver): use device='cpu'")
        limit = spec.decoder.max_position_embeddings
        if max_seq is not None and not 0 < max_seq <= limit:
            raise SettingError("", "max_seq", max_seq, f"must be between 1 and the model's context ({limit})")
        self.max_seq = max_seq or limit
        self.vision = load_vision(checkpoint, self.dtype).to(self.device).eval()
        self.lm = load_language_model(checkpoint, self.dtype).to(self.device).eval()
        self._cache, self._pos = None, 0

    @torch.inference_mode()
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(self.device)
        return self.vision(x).float().cpu().numpy()

    @torch.inference_mode()
    def embed_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(token_ids, dtype=np.int64)).to(self.device)
        return self.lm.embed(ids).float().cpu().numpy()

    @torch.inference_mode()
    def _step(self, embeds: "torch.Tensor") -> np.ndarray:
        n = embeds.shape[1]
        positions = torch.arange(self._pos, self._pos + n, device=self.device)[None]
        logits, self._cache = self.lm(embeds, positions, self._cache)
        self._pos += n
        return logits[0, -1].cpu().numpy()

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        self._cache, self._pos = self.lm.empty_cache(), 0
        return self._step(torch.from_numpy(np.ascontiguousarray(inputs_embeds)).to(self.device, self.dtype)[None])

    def decode(self, token_id: int) -> np.ndarray:
        with torch.inference_mode():
            embeds = self.lm.embed(torch.tensor([[token_id]], device=self.device))
        return self._step(embeds)

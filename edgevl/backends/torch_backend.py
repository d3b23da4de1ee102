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
    """numpy (incl. ml_dtypes bfloat16, which torch cannot read directly) -> torch, copied out of the mmap."""
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.array(array).view(np.int16)).view(torch.bfloat16).to(dtype)
    return torch.from_numpy(np.array(array)).to(dtype)


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
        # Built on the meta device: no random init of weights that are replaced right away.
        with torch.device("meta"):
            self.vision, self.lm = VisionModel(spec), LanguageModel(spec.decoder)
        self.lm.rope = Rope(spec.decoder)  # computed tables, not weights: build them for real
        for module, prefix in ((self.vision, ""), (self.lm, "decoder.")):
            state = {name[len(prefix):]: to_tensor(w, self.dtype)
                     for name, w in checkpoint.weights.items() if name.startswith(prefix)}
            if not prefix:
                state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
            module.load_state_dict(state, strict=True, assign=True)
            module.to(self.device).eval()
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

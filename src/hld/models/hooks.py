"""Forward hooks that keep only the chosen layers' hidden states (never output_hidden_states=True,
which keeps every layer). Layer i: 0 = embedding output, i >= 1 = output of decoder block i."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch
from torch import nn

from hld.errors import HldError

# A Hugging Face causal LM. Its submodules and config are attributes torch types as `Tensor | Module`
# (nn.Module.__getattr__), so it is typed loosely where those attributes are read.
CausalLM = Any


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after the deepest needed layer runs)."""


def text_config(config):
    """The language model's config: a multimodal config's `text_config` (Gemma 3 4B/12B/27B keep
    hidden_size, layers and vocabulary there), else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_of(model: CausalLM) -> CausalLM:
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def n_blocks(model: CausalLM) -> int:
    return len(decoder_of(model).layers)


def _layer_module(model: CausalLM, layer: int) -> nn.Module:
    dec = decoder_of(model)
    if not 0 <= layer <= len(dec.layers):
        raise HldError(
            f"layer {layer} is out of range 0..{len(dec.layers)}",
            f"this model has {len(dec.layers)} blocks; choose layers in 0..{len(dec.layers)}",
        )
    return dec.embed_tokens if layer == 0 else dec.layers[layer - 1]


class LayerCapture:
    """Keeps the outputs of `layers` from the most recent forward pass; optionally stops the pass
    after the deepest of them (`stop_after=True`)."""

    def __init__(self, model: nn.Module, layers: Iterable[int]) -> None:
        self.layers = sorted(set(layers))
        self.captured: dict[int, torch.Tensor] = {}
        self.stop_after: Optional[int] = None
        self._handles = [_layer_module(model, i).register_forward_hook(self._hook(i)) for i in self.layers]

    def _hook(self, layer: int):
        def fn(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.captured[layer] = out
            if self.stop_after == layer:
                raise StopForward

        return fn

    def pop(self) -> dict[int, torch.Tensor]:
        out, self.captured = self.captured, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def forward_windows(lm: CausalLM, ids: torch.Tensor) -> Iterator[int]:
    """The decoder run on each window of `ids` (n, T) alone, for the hooks it feeds (a capture that has what
    it needs stops a forward early with StopForward); yields each window's index after its forward."""
    for w in range(ids.shape[0]):
        try:
            decoder_of(lm)(input_ids=ids[w : w + 1], use_cache=False)
        except StopForward:
            pass
        yield w

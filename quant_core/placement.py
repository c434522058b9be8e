"""Layer-wise offload: the weights rest in host memory and each decoder layer visits the GPU for its turn.

A model whose weights do not fit one GPU can still be evaluated and GPTQ-quantized there, because both
go layer by layer: the hidden states of every window pass through layer i before layer i+1 is needed.
``python -m quant_core plan`` says when a job needs this ("offload: N GiB on GPU"); the pipeline then
loads the model into host memory and runs those stages through :func:`visiting` and
:func:`offloaded_hidden`. Rotation learning streams too (quant_core.learn): with layer checkpointing each
layer visits in the forward and again when backward recomputes it, so only one layer's weights (and the
layer inputs saved by the checkpoints) are on the GPU at a time.

Example:
    >>> place = Placement("cuda", offload=True)
    >>> for hidden in offloaded_hidden(model, batches, place): ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .config import ConfigError
from .progress import CancelFn, ProgressFn, check_cancel, never_cancel, no_progress

if TYPE_CHECKING:  # models imports nothing of this module; the import is for the checker only
    from .models import DecoderLM


def pick_device(device: str) -> str:
    """The device a name means: auto is CUDA when available; a CUDA device that is not there is refused."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    index = device.removeprefix("cuda:")
    if device not in ("cpu", "cuda") and not (device.startswith("cuda:") and index.isdigit()):
        raise ConfigError("device", f"device={device!r} is not valid", "auto, cpu, cuda, cuda:N")
    if device != "cpu" and not torch.cuda.is_available():
        raise ConfigError("device", f"device={device!r} was requested but no CUDA device is available; accepted here: "
                          "cpu, auto")
    if device.startswith("cuda:") and int(index) >= torch.cuda.device_count():
        raise ConfigError("device", f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


@dataclass(frozen=True)
class Placement:
    """Where a stage computes, and whether the weights rest in host memory between layers."""

    compute: str  # "cuda" or "cpu": where the matmuls run
    offload: bool = False  # True: weights live on the CPU and visit `compute` one layer at a time


@contextmanager
def visiting(module: nn.Module, place: Placement) -> Iterator[nn.Module]:
    """Move ``module`` to the compute device for the block and back to host memory after it
    (also on an exception, so a cancelled stage leaves no layer behind on the GPU). No-op without offload."""
    if not place.offload:
        yield module
        return
    module.to(place.compute)
    try:
        yield module
    finally:
        module.to("cpu")


@torch.no_grad()
def offloaded_hidden(
    model: DecoderLM,
    batches: Sequence[Tensor],
    place: Placement,
    *,
    progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    stage: str = "evaluate",
) -> Iterator[Tensor]:
    """Final hidden states of each (B, L) id batch, computed layer by layer with every batch's hidden state
    kept in host memory between layers. The same operations on the same batches as ``model.hidden(ids)``,
    so the values are identical; only where the weights sit differs.

    Yields (B, L, d) final hidden states on the compute device, one per batch, after the last layer has run;
    the lm_head is on the compute device while the consumer holds each one (it scores them there).
    ``progress(stage, fraction, {"layer": i, "of": n})`` is called after every layer.
    """
    dev = torch.device(place.compute)
    store = torch.device("cpu") if place.offload else dev
    n_layers = len(model.model.layers)
    with visiting(model.model.embed_tokens, place):
        hidden = [model.embed(ids.to(dev)).to(store) for ids in batches]  # each (B, L, d)
    cos, sin = model.rope(batches[0].shape[1], dev, hidden[0].dtype)
    for i, layer in enumerate(model.model.layers):
        check_cancel(should_cancel, f"{stage}: layer {i + 1}/{n_layers}")
        with visiting(layer, place):
            hidden = [layer(h.to(dev), cos, sin, model.quant).to(store) for h in hidden]
        progress(stage, (i + 1) / (n_layers + 1), {"layer": i + 1, "of": n_layers})
    with visiting(model.model.norm, place), visiting(model.lm_head, place):
        for h in hidden:
            yield model.final_hidden(h.to(dev))


__all__ = ["Placement", "offloaded_hidden", "pick_device", "visiting"]

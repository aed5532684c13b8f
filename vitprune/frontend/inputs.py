"""The input size a model takes: read from the model (or given), and checked against its first
convolution before any capture, so a wrong size is one clear line, not a shape error deep inside."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from vitprune.errors import InputError, VitpruneError
from vitprune.frontend.load import input_size_of


def resolve_input_size(model: nn.Module, spec_size: tuple[int, int, int] | None = None,
                       given: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    if spec_size:
        return tuple(spec_size)
    if given:
        return tuple(given)
    return input_size_of(model)


def check_input_size(model: nn.Module, input_size: Sequence[int]) -> None:
    """Refuse an input size the model's first convolution cannot take, before any capture.

    The convolution is the first ``nn.Conv2d`` the forward reaches (found by running the model at
    its own input size up to that call; the first one registered when that does not work): the
    patch embedding of a ViT, or the stem of a hybrid. Its ``in_channels`` must equal C, and for a
    patchifying convolution (kernel = stride, no padding) H and W must be multiples of the patch."""
    found = first_conv(model)
    if found is None:
        return  # e.g. a .pt2 module: its input size is fixed and checked when it is loaded
    name, conv = found
    c, h, w = (int(v) for v in input_size)
    if c != conv.in_channels:
        raise InputError(f"the model expects {conv.in_channels} input channels (its first convolution, {name}, "
                         f"takes {conv.in_channels}) but the input size {c}x{h}x{w} has {c}")
    if conv.padding == "same":
        return  # any size fits
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    pads = conv.padding if isinstance(conv.padding, tuple) else (0, 0)  # "valid" is no padding
    reach = [conv.dilation[i] * (conv.kernel_size[i] - 1) + 1 - 2 * pads[i] for i in (0, 1)]
    patchify = (kh, kw) == (sh, sw) and pads == (0, 0) and conv.dilation == (1, 1)
    px = f"{kh} px" if kh == kw else f"{kh}x{kw} px"
    what = f"the model's patch is {px}" if patchify else f"the model's first convolution is {px}"
    if h < reach[0] or w < reach[1]:
        raise InputError(f"{what} ({name}, stride {sh}x{sw}) and the input {c}x{h}x{w} is smaller than that")
    if patchify and (h % sh or w % sw):
        raise InputError(f"{what} ({name}) and the input {c}x{h}x{w} is not a multiple of it: the border "
                         f"would be cut off; use a multiple of {sh}, e.g. {max(sh, h // sh * sh)}")


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """``(name, conv)`` of the first ``nn.Conv2d`` the model applies to its input, or None."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return None
    reached = _first_called(model, convs)
    return reached if reached is not None else convs[0]


class _Reached(Exception):
    """Stops the probe forward at the first convolution."""


def _first_called(model: nn.Module, convs: list[tuple[str, nn.Conv2d]]) -> tuple[str, nn.Conv2d] | None:
    """Run the model on a zero image of its own input size until the first Conv2d is called."""
    try:
        size = resolve_input_size(model)
    except VitpruneError:
        return None
    names = {id(m): n for n, m in convs}

    def hook(module: nn.Module, args: Any) -> None:
        raise _Reached(names[id(module)], module)

    param = next(iter(model.parameters()), None)
    like = {"device": param.device, "dtype": param.dtype} if param is not None and param.is_floating_point() else {}
    handles = [m.register_forward_pre_hook(hook) for _, m in convs]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *size, **like))
    except _Reached as e:
        return e.args[0], e.args[1]
    except Exception:  # the model's own checks refused the probe: fall back to registration order
        return None
    finally:
        for h in handles:
            h.remove()
    return None

"""The precision policy, in one place.

* **float32** everywhere by default: parameters, activations, log-determinants, and the
  logistic-mixture CDF, pdf and inverse (as the official Flow++ trains); ``float64: true`` on a
  Flow++ coupling evaluates its mixture in float64.
* **TF32** matrix products and convolutions on CUDA (``torch.backends.cuda.matmul.allow_tf32`` and
  cuDNN's), set by training and by the service's CUDA executors.
* **bf16** (``precision: bf16`` in a training config): only the *conditioner networks* (the nets
  inside couplings and the variational dequantizer's context net) run under autocast; what they
  return is cast back to float32 before any bijector uses it, so every transform, log-determinant
  and the loss stay float32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Precision = Literal["fp32", "bf16"]
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
CONDITIONERS = ("net", "scale_net", "shift_net", "context")  # attribute names of conditioner networks in layers


def conditioned(net: nn.Module, *args: Tensor | None) -> Tensor:
    """``net(*args)``, under autocast when the policy gave ``net`` a lower precision; float32 out."""
    dtype = getattr(net, "autocast_dtype", None)
    if dtype is None:
        return net(*args)
    with torch.autocast(args[0].device.type, dtype=dtype):
        out = net(*args)
    return out.float()


def set_precision(model: nn.Module, precision: Precision) -> int:
    """Give every conditioner network of ``model`` the policy's autocast dtype; returns how many.

    An attribute, not a module or a buffer: the state dict (and so every artifact) is unchanged.
    """
    dtype = DTYPES[precision]
    nets = 0
    for layer in model.modules():
        for name in CONDITIONERS:
            net = getattr(layer, name, None)
            if isinstance(net, nn.Module):
                net.autocast_dtype = dtype
                nets += 1
    return nets


def enable_tf32() -> None:
    """TF32 for float32 matrix products and convolutions on CUDA (no effect elsewhere)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

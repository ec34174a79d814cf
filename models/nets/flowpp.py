"""Flow++'s conditioning network: gated residual convolutions and gated multi-head self-attention.

All tensors are ``(B, C, H, W)``. One block is

    x ← x + GLU(nin(dropout(ce(conv3×3(ce(x)) [+ nin(ce(context))]))))      (gated residual conv)
    x ← LayerNorm_C(x)
    x ← x + GLU(nin(dropout(MHSA(nin(x + pos)))))                          (gated attention)
    x ← LayerNorm_C(x)

with ``ce(x) = elu([x, −x])`` (concat-ELU) and ``GLU([h₁, h₂]) = h₁ ⊙ σ(h₂)``. Attention runs over
all ``H·W`` positions with a learned positional embedding (init N(0, 0.01²)). Convolutions use the
official CIFAR code's data-dependent init (:class:`DataInitConv2d`), not weight normalisation.

Memory layout: the networks run channels-last (NHWC strides; shapes stay ``(B, C, H, W)``). On the
CPU oneDNN's convolutions are faster that way, q, k and v come out of their projection with the
head dimension at stride 1 (no copies before attention), the layer norm reads contiguous channel
vectors, and a coupling's mixture parameters arrive with their K components contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..moments import Reduce, moments


def concat_elu(x: Tensor) -> Tensor:
    """``elu([x, −x])`` over channels: ``(B, C, ...) -> (B, 2C, ...)``."""
    return F.elu(torch.cat([x, -x], 1))


def glu(h: Tensor) -> Tensor:
    """``h₁ ⊙ σ(h₂)`` for ``h = [h₁, h₂]`` split on channels."""
    a, gate = h.chunk(2, 1)
    return a * torch.sigmoid(gate)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (zero with probability ``p``, scale the rest by ``1/(1−p)``) with a cheaper mask on the CPU.

    On the CPU the mask is ``U < 1 − p`` for uniform draws ``U`` (float32, resolution 2⁻²⁴):
    torch's CPU ``bernoulli_`` draws its mask about 2.5× slower than ``rand``, and dropout's masks
    were 8% of a Flow++ training step on 28×28 inputs. The same distribution; on other devices
    (a fused kernel there) and in evaluation, exactly ``nn.Dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.device.type != "cpu" or not 0.0 < self.p < 1.0:
            return super().forward(x)
        keep = 1.0 - self.p
        mask = torch.rand(x.shape, device=x.device) < keep
        return x * mask.to(x.dtype).mul_(1.0 / keep)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q kᵀ / √d) v`` per head: ``(B, heads, T, d)`` each → ``(B, heads, T, d)``, on SDPA's fused kernels.

    On the CPU a head dimension ``2 ≤ d < 16`` is zero-padded to 16 and the scale kept at ``1/√d``:
    zero columns add nothing to a score, and the output's padded columns (zero) are dropped. torch's
    CPU flash-attention kernel is that much faster at 16 than at 4 or 8 (T = 392, forward +
    backward: 155 → 106 ms at d = 8, 135 → 102 ms at d = 4; the AVX2 kernels likewise) that the
    padding pays for its copies. Not in ONNX export, where attention becomes MatMul and Softmax
    nodes and padding would only add work; not on other devices, whose kernels differ.
    """
    d = q.shape[-1]
    if q.device.type != "cpu" or not 2 <= d < 16 or torch.onnx.is_in_onnx_export():
        return F.scaled_dot_product_attention(q, k, v)
    q, k, v = (F.pad(t, (0, 16 - d)) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=d**-0.5)[..., :d]


class DataInitConv2d(nn.Conv2d):
    """Conv (``kernel`` 1 = a network-in-network dense layer) with data-dependent init.

    Weights start at N(0, 0.05²). Data-initialised (:func:`models.flows.base.data_init`): the weights
    and bias are rescaled so that, on the first batch, every output channel has mean 0 and standard
    deviation ``init_scale`` (0.1 for residual-branch outputs and the final projection, as in Flow++).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, init_scale: float = 1.0) -> None:
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
        nn.init.normal_(self.weight, 0.0, 0.05)
        nn.init.zeros_(self.bias)
        self.init_scale = init_scale
        self.register_buffer("initialized", torch.tensor(False))

    REDUCIBLE_INIT = True

    @torch.no_grad()
    def initialize(self, x: Tensor, reduce: Reduce | None = None) -> None:
        y = F.conv2d(x, self.weight, None, padding=self.padding)
        mean, var = moments(y, (0, 2, 3), reduce)
        scale = self.init_scale * torch.rsqrt(var + 1e-8)
        self.weight.mul_(scale.view(-1, 1, 1, 1))
        self.bias.copy_(-mean * scale)
        self.initialized.fill_(True)


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channel axis of ``(B, C, H, W)`` with learned gain and bias (eps 1e-5)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        c = self.g.shape[1]
        y = F.layer_norm(x.permute(0, 2, 3, 1), (c,), self.g.view(c), self.b.view(c), self.eps)
        return y.permute(0, 3, 1, 2)


class GatedConv(nn.Module):
    """Gated residual convolution; ``context`` (``(B, C_ctx, H, W)``) enters through a 1×1 projection."""

    def __init__(self, channels: int, context_channels: int = 0, dropout: float = 0.0, nin_out: bool = True) -> None:
        super().__init__()
        self.c1 = DataInitConv2d(2 * channels, channels, 3)
        self.context = DataInitConv2d(2 * context_channels, channels, 1) if context_channels else None
        self.dropout = Dropout(dropout)
        self.c2 = DataInitConv2d(2 * channels, 2 * channels, 1 if nin_out else 3, init_scale=0.1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.c1(concat_elu(x))
        if self.context is not None:
            if context is None:
                raise ValueError("this gated convolution was built for a context input")
            h = h + self.context(concat_elu(context))
        return x + glu(self.c2(self.dropout(concat_elu(h))))


class GatedAttention(nn.Module):
    """Gated multi-head self-attention over all positions: ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} filters do not split into {heads} heads")
        self.heads = heads
        self.qkv = DataInitConv2d(channels, 3 * channels, 1)
        self.dropout = Dropout(dropout)
        self.out = DataInitConv2d(channels, 2 * channels, 1, init_scale=0.1)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(x + pos).view(b, 3, self.heads, c // self.heads, h * w).permute(1, 0, 2, 4, 3)
        # The fused kernels (flash attention on the CPU and the GPU, memory-efficient on the GPU) need the head
        # dimension at stride 1; otherwise SDPA falls back to the math kernel, which keeps every T×T attention matrix
        # for backward (9.5× slower on the CPU at T = 392, and the memory of an MNIST run). Channels-last inputs give
        # it without a copy.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in qkv.unbind(0))
        a = attention(q, k, v)  # (B, heads, T, d)
        a = a.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels last
        return x + glu(self.out(self.dropout(a)))


class GatedPointwise(nn.Module):
    """The no-attention ablation: a per-position gated maxout MLP with the attention's parameter count."""

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = DataInitConv2d(channels, 3 * channels, 1)
        self.dropout = Dropout(dropout)
        self.out = DataInitConv2d(channels, 2 * channels, 1, init_scale=0.1)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        b, c, h, w = x.shape
        m = self.proj(x + pos).view(b, c, 3, h, w).amax(2)
        return x + glu(self.out(self.dropout(m)))


class FlowppBlock(nn.Module):
    """Gated conv → LayerNorm → gated attention (or pointwise) → LayerNorm."""

    def __init__(self, channels: int, heads: int, dropout: float, context_channels: int, attention: bool) -> None:
        super().__init__()
        self.conv = GatedConv(channels, context_channels, dropout)
        self.ln1 = ChannelLayerNorm(channels)
        self.attn = GatedAttention(channels, heads, dropout) if attention else GatedPointwise(channels, dropout)
        self.ln2 = ChannelLayerNorm(channels)

    def forward(self, x: Tensor, pos: Tensor, context: Tensor | None) -> Tensor:
        return self.ln2(self.attn(self.ln1(self.conv(x, context)), pos))


class FlowppConditioner(nn.Module):
    """Flow++ coupling network: ``(B, C_in, H, W)`` [+ context] → ``(B, C_out, H, W)``.

    3×3 conv to ``filters``, ``blocks`` × :class:`FlowppBlock`, 3×3 conv out (init scale 0.1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        size: tuple[int, int],
        filters: int = 96,
        blocks: int = 10,
        heads: int = 4,
        dropout: float = 0.0,
        context_channels: int = 0,
        attention: bool = True,
    ) -> None:
        super().__init__()
        self.proj_in = DataInitConv2d(in_channels, filters, 3)
        self.pos = nn.Parameter(0.01 * torch.randn(1, filters, *size))
        self.blocks = nn.ModuleList(FlowppBlock(filters, heads, dropout, context_channels, attention) for _ in range(blocks))
        self.proj_out = DataInitConv2d(filters, out_channels, 3, init_scale=0.1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.proj_in(x.contiguous(memory_format=torch.channels_last))
        if context is not None:
            context = context.contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            h = block(h, self.pos, context)
        return self.proj_out(h)


class ContextNet(nn.Module):
    """Flow++'s "shallow processor" for the dequantizer: ``(B, C_in, H, W') -> (B, channels, H, W')``.

    The dequantizer feeds it ``x/L − 0.5`` with even and odd columns stacked on channels; a 3×3
    conv, then ``blocks`` gated residual convolutions with 3×3 output convs.
    """

    def __init__(self, in_channels: int, channels: int = 32, blocks: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = DataInitConv2d(in_channels, channels, 3)
        self.blocks = nn.ModuleList(GatedConv(channels, 0, dropout, nin_out=False) for _ in range(blocks))

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        for block in self.blocks:
            x = block(x)
        return x

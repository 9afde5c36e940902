"""The layer kinds an adapter can wrap, each seen as one matrix W (out × in) and two operations.

Every adapter's maths (ΔW = s·B·A or s·B·R·A, merge, SVD inits, Riemannian preconditioning,
export) works on the 2-D factors A (r × in) and B (out × r). A layer kind says what ``in`` and
``out`` are for its weight, how the first factor meets the input (``project``) and how an r × r
or out × r factor mixes channels after it (``mix``):

| kind | W (out × in) | project(x, A) | mix(h, M) | PEFT keys |
| --- | --- | --- | --- | --- |
| nn.Linear, Conv1D | weight (Conv1D: its transpose) | x Aᵀ | h Mᵀ | lora_A/B.weight |
| nn.Conv2d | weight reshaped (out, in·kh·kw) | conv2d(x, A as r×in×kh×kw), the layer's stride, padding, dilation | 1×1 conv | lora_A.weight (r, in, kh, kw), lora_B.weight (out, r, 1, 1) |
| nn.Embedding | weight transposed (dim, vocab) | rows of Aᵀ for the ids | h Mᵀ | lora_embedding_A (r, vocab), lora_embedding_B (dim, r) |

Gradient estimation (lora-ga, lora-sb) needs ∂L/∂W = Δᵀ X from the layer's input and output gradient
(``rows``): for Linear and Conv1D the tokens' inputs, for Conv2d the unfolded input patches (PEFT's
reshaped (out, in·kh·kw) weight). Embedding is not estimable (its input is token ids): a data-driven
init on it is refused with one line.

These are PEFT's layouts (LoRA on Conv2d as in PEFT: A a conv with the layer's kernel, B a
1×1 conv), so exports load in PEFT. Refused: Conv2d with groups > 1 or a padding mode other
than zeros, Embedding with max_norm (it renormalises the weight in place). An Embedding
adapter applies no dropout to its input (token ids), as PEFT does.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.adapters.quantized import quantization_of
from lorakit.errors import LorakitError

try:  # transformers' GPT-2 style layer: y = x W + b with W stored (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment, misc]


class LayerKind:
    """One kind of adaptable layer (see the module doc). Stateless: every method takes the layer."""

    types: ClassVar[tuple[type, ...]]
    name: ClassVar[str]
    linear: ClassVar[bool] = False  # what targets='all-linear' selects
    estimable: ClassVar[bool] = False  # the gradient estimator's hooks (G = Σ δᵀx) apply to it
    takes_dropout: ClassVar[bool] = True  # the adapter's dropout applies to its input

    def check(self, layer: nn.Module) -> None:
        """Raise LorakitError for a configuration of the layer that lorakit cannot adapt."""

    def weight_out_in(self, layer: nn.Module) -> Tensor:
        raise NotImplementedError

    def project(self, layer: nn.Module, x: Tensor, A: Tensor) -> Tensor:
        raise NotImplementedError

    def mix(self, h: Tensor, M: Tensor) -> Tensor:
        return h @ M.T

    def rows(self, layer: nn.Module, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's input and output gradient as matrices X (tokens × in) and Δ (tokens × out) with
        ∂L/∂W = Δᵀ X (out × in): what gradient estimation accumulates (``estimable`` kinds only)."""
        return x.reshape(-1, x.shape[-1]), delta.reshape(-1, delta.shape[-1])

    def peft_tensors(self, layer: nn.Module, lora_B: Tensor, lora_A: Tensor) -> dict[str, Tensor]:
        """PEFT's keys (after the module name) for the exported factors s·lora_B·lora_A."""
        return {"lora_A.weight": lora_A, "lora_B.weight": lora_B}


class LinearKind(LayerKind):
    types = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
    name = "linear"
    linear = True
    estimable = True

    def weight_out_in(self, layer: nn.Module) -> Tensor:
        """A view, transposed for Conv1D (stored (in, out)); a quantized layer's dequantized weight (a new tensor)."""
        backend = quantization_of(layer)
        if backend is not None:
            return backend.dequantize(layer)
        w = layer.weight.data
        return w.T if Conv1D is not None and isinstance(layer, Conv1D) else w

    def project(self, layer: nn.Module, x: Tensor, A: Tensor) -> Tensor:
        return x @ A.T


class Conv2dKind(LayerKind):
    types = (nn.Conv2d,)
    name = "conv2d"
    estimable = True

    def check(self, layer: nn.Module) -> None:
        if layer.groups != 1:
            raise LorakitError(f"cannot adapt a Conv2d with groups={layer.groups}: lorakit adapts Conv2d with groups=1; "
                               "leave this layer out of targets")
        if layer.padding_mode != "zeros":
            raise LorakitError(f"cannot adapt a Conv2d with padding_mode={layer.padding_mode!r}: lorakit adapts "
                               "padding_mode='zeros'; leave this layer out of targets")

    def weight_out_in(self, layer: nn.Module) -> Tensor:
        w = layer.weight.data
        return w.view(w.shape[0], -1)  # (out, in·kh·kw), a view: merge writes through

    def project(self, layer: nn.Module, x: Tensor, A: Tensor) -> Tensor:
        kernel = A.view(A.shape[0], *layer.weight.shape[1:])
        return F.conv2d(x, kernel, None, layer.stride, layer.padding, layer.dilation)

    def mix(self, h: Tensor, M: Tensor) -> Tensor:
        return F.conv2d(h, M[:, :, None, None])

    def rows(self, layer: nn.Module, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """X: the unfolded input patches (one row per output position, in·kh·kw columns, in the order of the
        reshaped weight); Δ: the output gradient at those positions. ∂L/∂W (reshaped (out, in·kh·kw)) = Δᵀ X."""
        patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, in·kh·kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1]), delta.flatten(2).transpose(1, 2).reshape(-1, delta.shape[1])

    def peft_tensors(self, layer: nn.Module, lora_B: Tensor, lora_A: Tensor) -> dict[str, Tensor]:
        return {"lora_A.weight": lora_A.reshape(lora_A.shape[0], *layer.weight.shape[1:]),
                "lora_B.weight": lora_B[:, :, None, None]}


class EmbeddingKind(LayerKind):
    types = (nn.Embedding,)
    name = "embedding"
    takes_dropout = False

    def check(self, layer: nn.Module) -> None:
        if layer.max_norm is not None:
            raise LorakitError("cannot adapt an Embedding with max_norm (it renormalises its weight in place); "
                               "leave this layer out of targets")

    def weight_out_in(self, layer: nn.Module) -> Tensor:
        return layer.weight.data.T  # (embedding_dim, num_embeddings): ΔW = s·B·A is PEFT's (B A)ᵀ

    def project(self, layer: nn.Module, x: Tensor, A: Tensor) -> Tensor:
        return F.embedding(x, A.T, layer.padding_idx)

    def peft_tensors(self, layer: nn.Module, lora_B: Tensor, lora_A: Tensor) -> dict[str, Tensor]:
        return {"lora_embedding_A": lora_A, "lora_embedding_B": lora_B}


KINDS: tuple[LayerKind, ...] = (LinearKind(), Conv2dKind(), EmbeddingKind())
NAMES = "nn.Linear, transformers Conv1D, nn.Conv2d and nn.Embedding"


def kind_of(layer: nn.Module) -> LayerKind | None:
    """The layer's kind, None when lorakit cannot adapt it."""
    for kind in KINDS:
        if isinstance(layer, kind.types):
            return kind
    return None

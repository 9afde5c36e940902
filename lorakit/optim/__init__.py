"""Optimizers and training tricks: LoRA+ groups, Riemannian preconditioning, NEFTune."""

from lorakit.optim.clipping import ClippedAdamW, ClippedSGD, NonFiniteGradient
from lorakit.optim.factory import OPTIMIZERS, PRECONDITIONERS, make_optimizer
from lorakit.optim.groups import LORAPLUS_DEFAULT_RATIO, TrainableLayout, param_groups, trainable_layout
from lorakit.optim.neftune import NEFTuneHandle, enable_neftune
from lorakit.optim.riemannian import PairPreconditioner, RiemannianAdamW, RiemannianSGD

__all__ = [
    "LORAPLUS_DEFAULT_RATIO",
    "ClippedAdamW",
    "ClippedSGD",
    "NonFiniteGradient",
    "OPTIMIZERS",
    "PRECONDITIONERS",
    "NEFTuneHandle",
    "PairPreconditioner",
    "RiemannianAdamW",
    "RiemannianSGD",
    "TrainableLayout",
    "enable_neftune",
    "make_optimizer",
    "param_groups",
    "trainable_layout",
]

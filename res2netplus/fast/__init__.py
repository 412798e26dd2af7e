"""The speed path of Res2NetPlus: fused Mish + BatchNorm kernels (C++ on a CPU, Triton on a GPU), autograd Functions
that save less, activations rebuilt in the backward pass, and the modules that run on them (`FastBottle2neck`,
`ConvActNorm`, `MaxPool2d`). Hand-written: each submodule is exported from its own notebook, `nbs/00a_fast.*`."""
from .kernels import FAST_PATHS, set_fast_path, fast_path, build_kernels
from .gpu import gpu_mish
from .functions import MishBatchNorm, BatchNormAddMish
from .blocks import act_norm, norm_add_act, MaxPool2d, ConvActNorm, FastBottle2neck

__all__ = ['FAST_PATHS', 'set_fast_path', 'fast_path', 'build_kernels', 'gpu_mish', 'MishBatchNorm', 'BatchNormAddMish',
           'act_norm', 'norm_add_act', 'MaxPool2d', 'ConvActNorm', 'FastBottle2neck']

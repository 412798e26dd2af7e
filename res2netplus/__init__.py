__version__ = "0.1.0"
import warnings as _warnings

# fastai scripts its activations with `torch.jit.script` when imported (fastai/layers.py); torch deprecates that with a
# FutureWarning that every `res2netplus` command would print. It is hidden for this one import only: a user's own
# torch.jit.script calls still warn.
with _warnings.catch_warnings():
    _warnings.filterwarnings('ignore', message=r'`torch.jit.script` is deprecated', category=FutureWarning)
    from . import models as _models  # registers the variants with timm: `import timm, res2netplus` is enough

__version__ = "0.1.0"
from . import models as _models  # registers the Res2NetPlus variants with timm: `import timm, res2netplus` is enough

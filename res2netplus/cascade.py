"""Compatibility module (hand-written, like `all.py`): Cascade R-CNN lives in `res2netplus.detection.cascade`.
An `export.pkl` made before detection became a package names `res2netplus.cascade.CascadeRoIHeads` and its siblings;
this module keeps those paths resolving. New code imports from `res2netplus.detection`."""
from .detection.cascade import *
from .detection.cascade import __all__, _SINGLE_STAGE_ARGS, _CASCADE_ARGS  # noqa: F401

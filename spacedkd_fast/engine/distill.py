"""The distillers and their errors in one import (the classes live in :mod:`.spaced`,
:mod:`.self_kd` and :mod:`.errors`; the shared machinery in :mod:`.base`)."""

from .errors import NonFiniteLossError, ReplayMismatchError
from .model_io import frozen_bn_stats
from .self_kd import SelfDistiller
from .spaced import SpacedDistiller

__all__ = ["NonFiniteLossError", "ReplayMismatchError", "SelfDistiller", "SpacedDistiller",
           "frozen_bn_stats"]

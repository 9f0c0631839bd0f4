"""DirectShare (arXiv 2402.11819): units reuse the weights of their best-matching unit of an earlier layer."""

from .config import DirectShareConfig
from .method import BANK, DirectShare
from .modules import GatheredLinear, UnitBank
from .plan import DirectSharePlan, num_replaced, select_pairs

__all__ = ["BANK", "DirectShare", "DirectShareConfig", "DirectSharePlan", "GatheredLinear", "UnitBank",
           "num_replaced", "select_pairs"]

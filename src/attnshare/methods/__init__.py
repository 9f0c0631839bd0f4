"""The sharing methods, one folder each: config, plan, modules, planner and training side by side.

- ``sa/``: Shared Attention; ``lisa/``: LiSA; ``directshare/``: DirectShare; ``postshare/``: PostShare.
- ``base``: the :class:`SharingMethod` interface; ``surgery``: detaching/reattaching projections.

Methods are found by name through :mod:`attnshare.sharing.registry` (``get_method``), which imports a method's
folder only when it is used.
"""

from ..sharing.registry import METHODS, get_method, method_names, register_method

__all__ = ["METHODS", "get_method", "method_names", "register_method"]

"""What every sharing method has in common, below the methods themselves.

- ``state``: the sharing state kept on a shared model (applied plans, their undo steps, the per-forward context).
- ``registry``: method name -> implementation (imported when first used), and plans read back by method name.
- ``apply``: apply plans in order (each validated first) and undo them.

Layers below (arch, plan, attention, models, data, evaluate) never import from here; methods, training, the API,
benchmarks and the CLI build on it.
"""

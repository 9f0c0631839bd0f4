"""The attention seam shared by every method.

- ``functional``: pure attention math (shape-commented).
- ``dispatch``: one registered attention function per base implementation that lets a layer publish what later
  layers reuse, while HF's own function computes the layer's output.
- ``context``: the per-forward store that carries a donor's attention to its receivers.
"""

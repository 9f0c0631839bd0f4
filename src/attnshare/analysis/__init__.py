"""Analysis: measurements of a base model that the planners and reports build on.

- :mod:`.metrics`: the pure similarity functions; :mod:`.stats`: streaming accumulators; :mod:`.collect`:
  calibration tokens and attention recording.
- :mod:`.heads`: head similarity between layers and the best head permutation (SA aligned, LiSA's init).
- :mod:`.weights`: data-free weight similarity of attention units (what DirectShare matches by).
- :mod:`.sensitivity`: how far a plan moves the next-token distribution (KL, ppl).
- :mod:`.analyze` / :mod:`.report`: one ``attnshare analyze`` run of every measure (including the methods' own
  matching and sensitivity), its JSON/safetensors and heatmaps; these two sit above the methods.
"""

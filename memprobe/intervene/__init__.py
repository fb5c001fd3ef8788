"""Interventions: activation patching, neuron localization, suppression edits and patched-model export.

The only part of memprobe that changes a model. Edits (`ablation`) are plain data applied as runtime
hooks (plain torch, TransformerLens, nnsight) or baked into weights (`export`); their effect is
measured with the labellers in `memprobe.labels`.
"""

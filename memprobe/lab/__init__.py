"""The membership lab: a corpus whose membership is known (members trained on, non-members from the
same generators never seen) and the fine-tune that makes the members members.

Why: every memorization number computed on famous texts rests on a guess about what the model saw;
here the ground truth is made, recorded, and checked (PII spans, canaries, copies per document).
"""

from memprobe.lab.corpus import PRESETS, build_lab, load_lab

__all__ = ["PRESETS", "build_lab", "load_lab"]

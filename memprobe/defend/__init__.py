"""Defenses against memorization, judged on one privacy-utility evaluation (`memprobe.defend.evaluate`).

Training-time defenses change the data or the optimizer and fine-tune from the same base with the
same number of optimizer steps (dedup, rmft, dp); post-hoc defenses change the weights of the
undefended fine-tuned model (prune, posthoc).
"""

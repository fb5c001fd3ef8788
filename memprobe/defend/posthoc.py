"""Post-hoc defenses of the undefended fine-tuned model, built from a BUILD split of members: neuron
ablation (contrast localizer, Chang et al. 2024) and memprobe's learned low-rank edit.

Why a build split: an edit built from the very documents it is judged on measures its fit, not
its effect; here the targets are the memorized tokens (greedy-correct with p >= min_prob,
`memprobe.labels.token_labels`) of build-split member documents, the controls are build-split
non-members, and the evaluation (`memprobe.defend.evaluate`) uses held-out members only. Each edit
is folded into a fresh model (`memprobe.intervene.export.patched_model`), so the evaluation sees
ordinary weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel

METHODS = {"ablate": "contrast-neurons", "edit": "low-rank-edit"}
KNOBS = {"ablate": (0.001, 0.005, 0.02), "edit": (0.5, 1.0, 2.0)}  # neuron fraction; edit strength
RANGES = {"ablate": (0.0, 0.5), "edit": (0.0, 4.0)}  # open below, closed above


def check_knob(method: str, knob: float) -> None:
    """Refuse a knob outside its method's range, naming the range."""
    lo, hi = RANGES[method]
    if isinstance(knob, bool) or not isinstance(knob, (int, float)) or not lo < knob <= hi:
        what = "the share of MLP neurons ablated" if method == "ablate" else "the learned edit's strength"
        raise MemprobeError(f"{method} knob {knob!r} is out of range: it is {what}, in ({lo}, {hi}] "
                            f"(the study uses {KNOBS[method]})")


def memorized_targets(loaded: LoadedModel, docs: Sequence[dict[str, Any]], *, min_prob: float = 0.5,
                      max_tokens: int = 256) -> tuple[list, list]:
    """(targets whose positions are memorized tokens, ids of the documents with any)."""
    from memprobe.intervene.suppress import targets_from_labels
    from memprobe.labels import token_labels

    ids = [loaded.encode(d["text"])[:max_tokens] for d in docs]
    labels = token_labels(loaded.model, ids, min_prob=min_prob)
    keep = [i for i, lab in enumerate(labels) if lab.memorized[1:].any()]
    targets = targets_from_labels([ids[i] for i in keep], [labels[i].memorized for i in keep])
    return targets, [docs[i]["id"] for i in keep]


def build_posthoc(loaded: LoadedModel, method: str, build_members: Sequence[dict[str, Any]],
                  build_controls: Sequence[dict[str, Any]], *, seed: int = 0, edit_steps: int = 30,
                  edit_lr: float = 3e-3) -> Any:
    """The edit of `method` ('ablate' or 'edit') at unit knob, built from the build split
    (edit_steps, edit_lr: the learned edit's Adam schedule)."""
    from memprobe.intervene.suppress import make_edit, targets_from_labels

    if method not in METHODS:
        raise MemprobeError(f"post-hoc method {method!r}: choose one of {', '.join(METHODS)}")
    memorized, ids = memorized_targets(loaded, build_members)
    if not memorized:
        raise MemprobeError("no build-split member has a memorized token: the fine-tuned model memorized "
                            "nothing to suppress (train longer, or use a model that memorizes)")
    controls = targets_from_labels([loaded.encode(d["text"])[:256] for d in build_controls])
    fraction = KNOBS["ablate"][0]
    edit = make_edit(loaded.model, METHODS[method], memorized, controls, fraction=fraction, seed=seed,
                     steps=edit_steps, lr=edit_lr)
    edit.meta["built_from_ids"] = ids
    return edit


def edit_at_knob(loaded: LoadedModel, method: str, edit: Any, knob: float, build_members: Sequence[dict],
                 build_controls: Sequence[dict], *, seed: int = 0) -> Any:
    """The edit of `method` at `knob` (kept apart from the model so it can be saved with
    `save_edit`): a neuron fraction (ablate) is rebuilt from the same scores; a strength (edit)
    scales the learned edit."""
    from memprobe.intervene.suppress import make_edit, targets_from_labels

    check_knob(method, knob)
    if method == "edit":
        return edit.with_strength(knob)
    memorized, _ = memorized_targets(loaded, build_members)
    controls = targets_from_labels([loaded.encode(d["text"])[:256] for d in build_controls])
    return make_edit(loaded.model, METHODS[method], memorized, controls, fraction=knob, seed=seed)


def with_knob(loaded: LoadedModel, method: str, edit: Any, knob: float, build_members: Sequence[dict],
              build_controls: Sequence[dict], *, seed: int = 0) -> nn.Module:
    """A fresh model with `edit_at_knob(...)` folded in."""
    from memprobe.intervene.export import patched_model

    return patched_model(loaded.model, edit_at_knob(loaded, method, edit, knob, build_members, build_controls,
                                                    seed=seed))

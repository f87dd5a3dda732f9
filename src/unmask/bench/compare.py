"""`unmask bench` over several models and cache modes in one run (`--model A --model B --cache ...`).

Each (model, cache mode) pair is one arm: the whole strategy list decoded on the same problems by
`run_bench`, into a folder of its own under `--out` (`<model>-<cache>/`, with its own
`problems.jsonl`, so an interrupted comparison resumes arm by arm). The arms run one after another
in this process, so their seconds are measured alike and compare as ratios. The combined
`results.json` at `--out` holds every arm's rows, each naming its `model` and `cache`
(docs/results.md), and `results.md` / `pareto.png` show them side by side.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from unmask.bench.runner import BenchConfig, run_bench, write_results
from unmask.errors import UnmaskError


def arm_folder(model: str | None, cache: str) -> str:
    """The folder of one arm under `--out`: the model's name (a path's last part) and the cache mode."""
    name = "builtin" if model is None else model.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) + "-" + cache


def run_comparison(cfg: BenchConfig, models: list[str | None], caches: list[str], progress: bool = True,
                   on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Every strategy of `cfg` on every model with every cache mode; write and return the combined
    results. One model and one cache mode is a plain `run_bench` (its results at `cfg.out`)."""
    models, caches = list(models) or [None], list(caches) or [cfg.cache]
    if len(models) == 1 and len(caches) == 1:
        return run_bench(replace(cfg, model=models[0], cache=caches[0]), progress=progress, on_row=on_row)
    folders = [arm_folder(m, c) for m in models for c in caches]
    if len(set(folders)) < len(folders):
        raise UnmaskError("two --model values share a name (" + ", ".join(sorted({f for f in folders if folders.count(f) > 1}))
                          + "); give each model once, from folders of different names", field="model")
    out = Path(cfg.out)
    arms = []  # (model, folder, results) of each arm, in order
    for model in models:
        for cache in caches:
            folder = arm_folder(model, cache)

            def tagged(row: dict, model=model, cache=cache) -> None:
                if on_row is not None:
                    on_row(dict(row, model=model or "builtin", cache=cache))

            results = run_bench(replace(cfg, model=model, cache=cache, out=str(out / folder)), progress=progress,
                                on_row=tagged)
            arms.append((model, folder, results))
    # each model's name in the table: its checkpoint's (a path's last part), or its folder's if two share one
    names = {model: results["model"].rstrip("/").split("/")[-1] for model, _, results in arms}
    if len(set(names.values())) < len(names):
        names = {model: arm_folder(model, "")[:-1] for model in names}
    rows = [dict(row, model=names[model], cache=results["cache"]) for model, _, results in arms for row in results["rows"]]
    first = arms[0][2]
    combined = {
        "model": ", ".join(dict.fromkeys(names.values())),
        "task": cfg.task, "split": cfg.split, "device": first["device"], "limit": cfg.limit, "seed": cfg.seed,
        "gen_length": first["gen_length"], "block_length": first["block_length"], "batch_size": cfg.batch_size,
        "cache": ", ".join(dict.fromkeys(results["cache"] for _, _, results in arms)), "backend": cfg.backend,
        "rows": rows,
        "arms": [{"model": names[model], "cache": results["cache"], "folder": folder,
                  "gen_length": results["gen_length"], "block_length": results["block_length"]}
                 for model, folder, results in arms],
    }
    write_results(combined, out)
    return combined

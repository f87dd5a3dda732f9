"""Peak memory of one decode step at a real checkpoint's vocabulary and lengths, by mode.

What a decode holds per call grows with what it computes at the vocabulary's width, so a network
with LLaDA-8B's vocabulary (126,464), a small body (width 256, 2 layers) and random weights shows
it on any machine: a batch of sequences with 256-token generations in blocks of 32, each mode
stopped after a few steps (a step's peak is reached at once). Every setting runs in a fresh process,
so its peak is its own: on CUDA, `torch.cuda.max_memory_allocated` above the loaded model; on a
CPU, the process's peak resident memory above what it held with the model loaded.

    python benchmarks/decode_memory.py --out runs/decode-memory
    python benchmarks/decode_memory.py --src /path/to/older/checkout/src   # another version, same settings

The modes: one call per block (`low_confidence:steps=8`: every step is a plain model call), the
same under the dual KV cache, sampling (temperature 0.5: LLaDA's float64 Gumbel noise), and
`learned_drafts` with four chains at depth 5 (21 canvases per sequence in each verification call;
its controller is an untrained one written for the run, which changes no sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "block": ("low_confidence:steps=8", "none"),
    "block, dual cache": ("low_confidence:steps=16", "dual"),
    "sampling": ("low_confidence:steps=8,temperature=0.5", "none"),
    "21 draft canvases": ("learned_drafts:order=controller+position+confidence+least_confident,depth=5,"
                          "controller={controller}", "none"),
}
SHAPE = dict(d_model=256, n_heads=4, n_layers=2, mlp_hidden_size=512, vocab_size=126464, mask_token_id=126336,
             eos_token_id=126081, pad_token_id=126081, max_sequence_length=4096)


class Stop(Exception):
    """Raised from the progress callback to end a decode after its measured steps."""


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child(args) -> None:
    """One setting in this process: print a JSON line with its peak memory and seconds per step."""
    import torch

    from unmask.decoding import generate
    from unmask.models.base import DecodeDefaults, DiffusionLM
    from unmask.models.llada import LLaDAConfig, LLaDANetwork
    from unmask.models.loading import builtin_path
    from unmask.models.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = LLaDAConfig(**SHAPE)
    torch.manual_seed(0)
    network = LLaDANetwork(cfg)
    network.init_weights(seed=0)
    network = network.to(device).eval()
    model = DiffusionLM(network=network, tokenizer=Tokenizer.from_dir(builtin_path()), mask_id=cfg.mask_token_id,
                        eos_id=cfg.eos_token_id, stop_ids=(cfg.eos_token_id,), pad_id=cfg.pad_token_id,
                        name="random-vocab-126k", defaults=DecodeDefaults(), supports_cache=True,
                        max_length=cfg.max_sequence_length)
    strategy, cache = args.strategy, args.cache
    if "{controller}" in strategy:
        from unmask.testing import write_tiny_controller

        strategy = strategy.format(controller=write_tiny_controller(Path(tempfile.mkdtemp()) / "c", stability=True))
    gen = torch.Generator().manual_seed(0)
    prompts = [row.tolist() for row in torch.randint(0, 100_000, (args.batch_size, args.prompt_length), generator=gen)]
    steps = {"n": 0, "t0": 0.0}

    def progress(step):
        if step == 1:
            steps["t0"] = time.perf_counter()
        steps["n"] = step
        if step >= args.steps:
            raise Stop

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kb() * 1024
    start = time.perf_counter()
    try:
        generate(model, prompts, strategy, gen_length=args.gen_length, block_length=args.block_length, cache=cache,
                 early_stop=False, progress=progress)
    except Stop:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    later = max(steps["n"] - 1, 1)
    print(json.dumps({"peak_bytes": peak, "steps": steps["n"],
                      "s_per_step": (time.perf_counter() - steps["t0"]) / later if steps["n"] > 1 else
                      time.perf_counter() - start}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", action="append", dest="modes", help=f"one of: {'; '.join(MODES)} (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="steps of each decode before it is stopped")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--src", action="append", default=[],
                   help="a source tree to measure instead of the installed unmask (repeat to compare versions)")
    p.add_argument("--out", default="runs/decode-memory")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    modes = args.modes or list(MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"error: unknown mode {unknown[0]!r}; choose from: {'; '.join(MODES)}", file=sys.stderr)
        return 2
    rows = []
    for src in args.src or [None]:
        for mode in modes:
            strategy, cache = MODES[mode]
            env = dict(os.environ)
            if src:
                env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), env.get("PYTHONPATH", "")])
            cmd = [sys.executable, __file__, "--child", "--strategy", strategy, "--cache", cache,
                   "--batch-size", str(args.batch_size), "--prompt-length", str(args.prompt_length),
                   "--gen-length", str(args.gen_length), "--block-length", str(args.block_length),
                   "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"src": src or "installed", "mode": mode, "error": tail}
                print(f"{mode:>20} [{src or 'installed'}]: failed: {tail}", flush=True)
            else:
                row = {"src": src or "installed", "mode": mode, **json.loads(done.stdout.strip().splitlines()[-1])}
                print(f"{mode:>20} [{src or 'installed'}]: peak {row['peak_bytes'] / 2**20:8.0f} MiB, "
                      f"{row['s_per_step']:.2f} s per step", flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where = platform.processor() or platform.machine()
    header = (f"vocabulary 126,464, width 256, 2 layers, random weights; batch {args.batch_size}, prompt "
              f"{args.prompt_length}, gen {args.gen_length}, block {args.block_length}; {args.steps} steps; "
              f"{args.device} ({where})")
    (out / "decode_memory.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    lines = [f"# {header}", "", "| version | mode | peak MiB | s per step |", "|---|---|---|---|"]
    lines += [f"| {r['src']} | {r['mode']} | " + (f"{r['peak_bytes'] / 2**20:.0f} | {r['s_per_step']:.2f} |"
                                                  if "error" not in r else f"failed: {r['error']} | |") for r in rows]
    (out / "decode_memory.md").write_text("\n".join(lines) + "\n")
    print(f"table: {out / 'decode_memory.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Wall-clock speed of a random-weight network at a real checkpoint's exact shape.

Speed does not depend on the weights, so a LLaDA-8B-shaped network with random weights measures
what decoding LLaDA-8B costs on a machine without downloading it. The network is built on the
target device directly (no 16 GB host copy), prompts are random token ids of a fixed length, and
every figure comes from the one decode loop (`unmask.decoding.generate`), as in `unmask bench`.

    python benchmarks/random_speed.py --shape llada-8b --device cuda --dtype bf16 \\
        --strategy threshold --cache none --cache dual --batch-size 1 --batch-size 32 --out runs/gpu-speed
    python benchmarks/random_speed.py --shape tiny     # a seconds-long check on a CPU

What random weights mean for the figures: every prediction is nearly uniform over the vocabulary,
so confidence rules (threshold, factor, ...) fall back to their one-forced-commit-per-call and
no answer ends early. Tokens/s is therefore the per-call throughput at one token per call over the
whole generation length: NFE equals gen length, and a trained model's TPF multiplies it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from unmask.decoding import generate
from unmask.errors import UnmaskError
from unmask.models.base import DecodeDefaults, DiffusionLM
from unmask.models.llada import LLaDAConfig, LLaDANetwork

# LLaDAConfig's defaults are LLaDA-8B's config.json (d_model 4096, 32 layers, 32 heads, SwiGLU
# 12288, vocabulary 126464, RoPE theta 500000)
SHAPES = {
    "llada-8b": {},
    "tiny": dict(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=192, vocab_size=512, mask_token_id=500,
                 eos_token_id=501, pad_token_id=501, max_sequence_length=1024),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_model(shape: str, device: str, dtype: str, seed: int = 0) -> DiffusionLM:
    """A LLaDA network of `shape` with N(0, 0.02) weights, built on `device` in `dtype`."""
    from unmask.models.loading import builtin_path
    from unmask.models.tokenizer import Tokenizer

    if shape not in SHAPES:
        raise UnmaskError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}", field="shape")
    if dtype not in DTYPES:
        raise UnmaskError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}", field="dtype")
    cfg = LLaDAConfig(**SHAPES[shape])
    with torch.device("meta"):
        network = LLaDANetwork(cfg)
    network = network.to_empty(device=device).to(DTYPES[dtype])
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    network.eval()
    # text is never read here; the built-in tokenizer only turns answers into (short) strings
    tokenizer = Tokenizer.from_dir(builtin_path())
    return DiffusionLM(network=network, tokenizer=tokenizer, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
                       stop_ids=(cfg.eos_token_id,), pad_id=cfg.pad_token_id, name=f"random-{shape}",
                       defaults=DecodeDefaults(), supports_cache=True, max_length=cfg.max_sequence_length)


def measure(model: DiffusionLM, strategy: str, cache: str, batch_size: int, prompt_length: int, gen_length: int,
            block_length: int, repeats: int, seed: int = 0) -> dict:
    """Decode `repeats` batches after one warm-up; totals over the timed ones."""
    gen = torch.Generator().manual_seed(seed)
    high = min(model.mask_id, model.eos_id)  # prompts never hold the mask or a stop token

    def prompts():
        ids = torch.randint(0, high, (batch_size, prompt_length), generator=gen)
        return [row.tolist() for row in ids]

    kwargs = dict(gen_length=gen_length, block_length=block_length, cache=cache, early_stop=False)
    generate(model, prompts(), strategy, **kwargs)  # warm-up: kernels, allocator
    useful = nfe = 0
    wall = model_s = 0.0
    for _ in range(repeats):
        result = generate(model, prompts(), strategy, **kwargs)
        wall += result.wall_s
        model_s += result.extras.get("model_s", 0.0)
        useful += sum(len(s.tokens) for s in result.sequences)
        nfe += sum(s.nfe for s in result.sequences)
    sequences = repeats * batch_size
    return {"strategy": strategy, "cache": cache, "batch_size": batch_size, "tokens_per_s": useful / wall,
            "latency_s": wall / repeats, "nfe": nfe / sequences, "s_per_call": wall / max(nfe / batch_size, 1),
            "model_time_frac": model_s / wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llada-8b", help=f"one of {', '.join(SHAPES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--strategy", action="append", dest="strategies", help="default: threshold")
    p.add_argument("--cache", action="append", dest="caches", help="default: none and dual")
    p.add_argument("--batch-size", action="append", type=int, dest="batch_sizes", help="default: 1 and 32")
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="timed batches per setting, after one warm-up")
    p.add_argument("--out", default="runs/random-speed")
    args = p.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    try:
        model = random_model(args.shape, args.device, dtype)
        rows = []
        for batch_size in args.batch_sizes or [1, 32]:
            for cache in args.caches or ["none", "dual"]:
                for strategy in args.strategies or ["threshold"]:
                    row = measure(model, strategy, cache, batch_size, args.prompt_length, args.gen_length,
                                  args.block_length, args.repeats)
                    rows.append(row)
                    print(f"{strategy:>14} cache {cache:>6} batch {batch_size:>3}: {row['tokens_per_s']:9.1f} tokens/s, "
                          f"{row['latency_s']:.3f} s per batch, {1000 * row['s_per_call']:.1f} ms per call", flush=True)
    except UnmaskError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as err:  # a batch too large for the device says so in one line
        print(f"error: out of memory on {args.device} ({str(err).splitlines()[0]}); lower --batch-size", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or platform.machine()
    params = sum(p.numel() for p in model.network.parameters())
    header = (f"random-weight {args.shape} ({params / 1e9:.2f}B parameters), {dtype}, {device}, prompt {args.prompt_length}, "
              f"gen {args.gen_length}, block {args.block_length}, {args.repeats} timed batches per row")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "random_speed.json").write_text(json.dumps({"header": header, "device": device, "rows": rows,
                                                       "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    lines = [f"# {header}", "", "| strategy | cache | batch | tokens/s | latency s | NFE | ms per call |", "|---|---|---|---|---|---|---|"]
    lines += [f"| `{r['strategy']}` | {r['cache']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | {r['latency_s']:.3f} | "
              f"{r['nfe']:.0f} | {1000 * r['s_per_call']:.1f} |" for r in rows]
    (out / "random_speed.md").write_text("\n".join(lines) + "\n")
    print(f"table: {out / 'random_speed.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Grouped experts against a per-expert loop: one MoE network's forward, both ways, on the same weights.

unmask groups a sparse layer's tokens by expert once and runs the experts as batched products (or,
for large calls, one product per expert over its contiguous rows; `unmask.models.moe.Experts`).
The reference modeling files loop over every expert, searching that expert's tokens among all of
them each time. This times a LLaDA-MoE-layout network (random weights; tiny but wide: 64 experts,
top-8 by default) both ways, in one process, at the sizes a decode's calls have (a cached call's
block at batch 1, a batch of blocks, whole canvases), and checks that both give the same logits.

    python benchmarks/moe_speed.py --out runs/moe-speed
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unmask.models.decoder import DecoderNetwork, LayerMLP, Layout
from unmask.models.moe import Experts, RouterConfig


def per_expert_loop(self: Experts, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The reference files' way: for every expert, find its tokens, run it on them, add them back."""
    out = torch.zeros_like(x)
    gate, up = self.gate_up[:, : self.inter], self.gate_up[:, self.inter:]
    for e in range(self.n):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        h = F.silu(x[token] @ gate[e].T) * (x[token] @ up[e].T)
        out.index_add_(0, token, (h @ self.down_proj[e].T) * weights[token, slot, None].to(x.dtype))
    return out


def network(experts: int, top_k: int, hidden: int, inter: int, layers: int, vocab: int) -> DecoderNetwork:
    router = RouterConfig(num_experts=experts, top_k=top_k, score="softmax")
    lay = Layout(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=4,
                 head_dim=hidden // 4, rope_theta=50000.0, rms_norm_eps=1e-5, qk_norm=True,
                 mlps=[LayerMLP(inter, router) for _ in range(layers)])
    net = DecoderNetwork(lay)
    net.init_weights(std=0.1, seed=0)
    return net.eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


SIZES = {  # (rows, tokens per row) of one model call
    "cached block, batch 1": (1, 32),
    "cached block, batch 8": (8, 32),
    "canvas, batch 1": (1, 256),
    "canvases, batch 8": (8, 256),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--inter", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20, help="timed forwards per way and size (the best is kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/moe-speed")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net = network(args.experts, args.top_k, args.hidden, args.inter, args.layers, vocab=512)
    grouped_forward = Experts.forward
    rows = []
    for label, (batch, length) in SIZES.items():
        ids = torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(length).expand(batch, -1)
        layer = net.model.layers[0].mlp  # one sparse layer on the hidden states of this call
        hidden = torch.randn(batch, length, args.hidden, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            grouped_logits = net(ids, positions)
            grouped = timed(lambda: net(ids, positions), args.repeats)
            grouped_layer = timed(lambda: layer(hidden), args.repeats)
            Experts.forward = per_expert_loop
            try:
                loop_logits = net(ids, positions)
                loop = timed(lambda: net(ids, positions), args.repeats)
                loop_layer = timed(lambda: layer(hidden), args.repeats)
            finally:
                Experts.forward = grouped_forward
        row = {"call": label, "tokens": batch * length, "layer_grouped_ms": grouped_layer * 1000,
               "layer_loop_ms": loop_layer * 1000, "layer_speedup": loop_layer / grouped_layer,
               "network_grouped_ms": grouped * 1000, "network_loop_ms": loop * 1000, "network_speedup": loop / grouped,
               "max_logit_difference": float((grouped_logits - loop_logits).abs().max())}
        rows.append(row)
        print(f"{label:>22} ({row['tokens']:>4} tokens): sparse layer {row['layer_grouped_ms']:6.2f} ms grouped, "
              f"{row['layer_loop_ms']:6.2f} ms per-expert loop, {row['layer_speedup']:.2f}x; whole network "
              f"{row['network_grouped_ms']:6.2f} / {row['network_loop_ms']:6.2f} ms, {row['network_speedup']:.2f}x "
              f"(logits agree to {row['max_logit_difference']:.1e})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = {"experts": args.experts, "top_k": args.top_k, "hidden": args.hidden, "inter": args.inter,
              "layers": args.layers, "threads": args.threads, "machine": platform.processor() or platform.machine()}
    (out / "moe_speed.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

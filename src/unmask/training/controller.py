"""TSPD's temporal-spatial controller: the networks, their training (`unmask train controller`), save and load.

A controller maps a masked position's features (`unmask.decoding.features`) at the calls of its
block so far to the probability that the position's top-1 is already its final token. It is
shared across positions and sequences, about 2K parameters, and comes in two architectures
(`--arch`, recorded as `arch` in controller.json):

- `mlp`: an MLP over a window of the position's features at the current call and the
  `window - 1` calls before it in the block (missing calls repeat the oldest one);
- `lstm` (default): an LSTM cell (hidden 16 by default) run over the position's features at every call of
  its block so far, oldest first, and a linear read-out of its hidden state: the paper's
  "LSTM-like" model. Online (`tspd`) it runs one step per call on a hidden state kept per
  (sequence row, generation position), reset at the position's block's first call; offline
  (training) it runs over the sequences that the trace file's `prev` links chain together.

The features carry the temporal part (the window, or the recurrence, over momentum and
confidence) and the spatial part (offsets, distances to decided neighbours, progress in the block).
By default a controller reads the paper's groups (confidence, entropy, momentum, position);
`--stability` adds unmask's stability group, a departure. The LSTM is the default, as in the paper;
the window MLP is a named departure. On EGP traces of 1,024 train problems per family of the
built-in model the two reach nearly the same validation loss and AUC (0.366 / 0.907 LSTM, 0.367 /
0.906 MLP; with the stability group 0.341 / 0.920 and 0.344 / 0.919, a gain that comes from the
streak and flip flag giving the EGP label away, and that decodes worse: docs/methods.md has the
rows).

Training follows the paper's appendix: class-weighted BCE, w1/w0 from inverse class frequency on
the training split, AdamW (lr 1e-3, weight decay 1e-2), on rows labelled from Extremely Greedy
Parallel traces (`unmask train collect-traces`). Added: features are standardised with the
training split's mean and std (stored in the controller), the validation split holds whole
decodes (rows of one decode are strongly correlated), and training stops early when the
validation loss has not improved for `patience` epochs, keeping the best epoch.

A controller is a folder: `controller.safetensors`, `controller.json` (arch, groups, features,
window, hidden, what it was trained on, metrics) and `loss.png`. By default it lives beside the
model it was trained for, in `<model_dir>/controller/` for the LSTM and `<model_dir>/controller-mlp/`
for the MLP (`-stability` appended with the stability group, `-drop-GROUP` for an ablation), which
is where `tspd` looks for it.
Folders written before `arch` existed are MLPs.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unmask.decoding.controller import (  # noqa: F401  (re-exported: the training API uses them)
    ARCHITECTURES,
    CONFIG_FILE,
    CONTROLLER_FORMAT,
    DEFAULT_HIDDEN,
    PLOT_FILE,
    WEIGHTS_FILE,
    Chains,
    Controller,
    RecurrentController,
    _ControllerBase,
    build_windows,
    checked_groups,
    default_controller_dir,
    load_controller,
    make_controller,
)
from unmask.errors import UnmaskError

# ---------------------------------------------------------------------------------------------
# training


def split_by_sequence(sequence: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train / validation row masks; whole decodes go to one side (at least one each when possible)."""
    ids = np.unique(sequence)
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_val = int(round(len(ids) * val_fraction))
    n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(ids) - 1) if len(ids) > 1 else 0
    val = np.isin(sequence, ids[:n_val])
    if n_val == 0 and val_fraction > 0:
        # one decode only: fall back to a row split so there still is a validation loss
        val = rng.random(len(sequence)) < val_fraction
    return ~val, val


def class_weights(labels: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """(w0, w1) by inverse class frequency: each class carries half of the total weight."""
    labels = torch.as_tensor(labels)
    n = labels.numel()
    positives = int(labels.sum())
    negatives = n - positives
    if positives == 0 or negatives == 0:
        kind = "positive" if negatives == 0 else "negative"
        raise UnmaskError(f"the training rows are all {kind}; collect traces from more prompts")
    return n / (2.0 * negatives), n / (2.0 * positives)


@dataclass
class ControllerTrainConfig:
    """Every knob of `unmask train controller`."""

    traces: tuple[str, ...] = ()
    out: str | None = None  # default: beside the model the traces came from
    drop: str | None = None  # feature group left out (ablation)
    stability: bool = False  # also read the stability features (a departure: the paper's set has none)
    arch: str = "lstm"  # lstm: LSTM cell over the position's calls in its block (the paper's); mlp: window MLP
    window: int = 3  # calls the MLP sees: this one and window - 1 before it (the LSTM sees them all)
    hidden: int | None = None  # default: 32 for mlp, 16 for lstm
    epochs: int = 200
    patience: int = 10  # epochs without a better validation loss before stopping
    batch_size: int = 512  # rows per batch (the LSTM takes whole sequences, about this many rows)
    lr: float = 1e-3
    weight_decay: float = 1e-2
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    plot: bool = True
    progress: bool = True

    @property
    def hidden_size(self) -> int:
        return DEFAULT_HIDDEN.get(self.arch, 0) if self.hidden is None else int(self.hidden)

    def validate(self) -> None:
        checked_groups(self.drop, self.stability)
        if self.arch not in ARCHITECTURES:
            raise UnmaskError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}", field="arch")
        for name in ("window", "epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise UnmaskError(f"{name} must be a positive integer, got {getattr(self, name)}", field=name)
        if self.hidden_size < 2:
            raise UnmaskError(f"hidden must be >= 2, got {self.hidden}", field="hidden")
        if self.lr <= 0 or self.weight_decay < 0:
            raise UnmaskError("lr must be > 0 and weight_decay >= 0", field="lr")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UnmaskError(f"val_fraction must be in [0, 1), got {self.val_fraction}", field="val_fraction")


def _weighted_bce(logits, labels, w0: float, w1: float) -> torch.Tensor:
    weight = torch.where(labels > 0.5, torch.full_like(labels, w1), torch.full_like(labels, w0))
    return (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weight).mean()


class _WindowInputs:
    """MLP training items: rows, each with its window of calls."""

    def __init__(self, data, labels, window: int, device):
        self.windows = build_windows(data.features, data.prev, window).to(device)
        self.labels = labels.to(device)

    def items(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.nonzero().squeeze(1)

    def rows(self, items: torch.Tensor) -> torch.Tensor:
        return items

    def logits(self, controller, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items = items.to(self.labels.device)
        return controller(self.windows[items]), self.labels[items]

    def per_batch(self, rows_per_batch: int, items: torch.Tensor) -> int:
        return rows_per_batch


class _SequenceInputs:
    """LSTM training items: whole (decode, block, position) sequences built from the `prev` links."""

    def __init__(self, data, labels, device):
        self.chains = Chains(data.features, data.prev)
        self.padded = self.chains.padded().to(device)  # (chains, T, F)
        grid = torch.zeros(self.padded.shape[:2])
        grid[self.chains.chain, self.chains.depth] = labels
        self.labels = grid.to(device)
        self.length = self.chains.length.to(device)

    def items(self, rows: torch.Tensor) -> torch.Tensor:
        # a sequence's rows all come from one decode, so its first row says which side it is on
        return rows[self.chains.head].nonzero().squeeze(1)

    def rows(self, items: torch.Tensor) -> torch.Tensor:
        return self.chains.rows_of(items)

    def logits(self, controller, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items = items.to(self.padded.device)
        length = self.length[items]
        steps = int(length.max())
        logits = controller(self.padded[items, :steps])
        valid = torch.arange(steps, device=length.device)[None, :] < length[:, None]
        return logits[valid], self.labels[items, :steps][valid]

    def per_batch(self, rows_per_batch: int, items: torch.Tensor) -> int:
        mean_length = float(self.length[items.to(self.length.device)].float().mean()) if len(items) else 1.0
        return max(1, round(rows_per_batch / mean_length))


@torch.no_grad()
def _evaluate(controller, inputs, items, w0, w1, per_batch: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Validation loss, probabilities and labels of every row of `items`."""
    parts = [inputs.logits(controller, items[i : i + per_batch]) for i in range(0, len(items), per_batch)]
    logits = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0)
    labels = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0)
    return float(_weighted_bce(logits, labels, w0, w1)), torch.sigmoid(logits), labels


def roc_auc(prob: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (ties count one half); nan without both classes."""
    prob, labels = prob.double().cpu(), labels.cpu() > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = prob.argsort()
    ranks = torch.empty_like(prob)
    ranks[order] = torch.arange(1, len(prob) + 1, dtype=torch.float64)
    # average ranks over ties
    values, inverse = torch.unique(prob, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _metrics(prob: torch.Tensor, labels: torch.Tensor) -> dict:
    out = {"accuracy": float(((prob > 0.5) == (labels > 0.5)).float().mean()) if len(labels) else float("nan"),
           "auc": roc_auc(prob, labels)}
    for tau in (0.5, 0.9):
        picked = prob > tau
        hits = (picked & (labels > 0.5)).sum()
        out[f"precision@{tau}"] = float(hits / picked.sum()) if picked.any() else float("nan")
        out[f"recall@{tau}"] = float(hits / (labels > 0.5).sum()) if (labels > 0.5).any() else float("nan")
    return out


def fit_controller(data, config: ControllerTrainConfig) -> tuple[Controller | RecurrentController, dict]:
    """Train a controller (`config.arch`) on `TraceData`; returns it (best validation epoch) and the training record."""
    config.validate()
    if len(data) == 0:
        raise UnmaskError("the traces hold no rows; collect traces from more prompts")
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    labels = torch.as_tensor(data.labels, dtype=torch.float32)
    train_rows, val_rows = split_by_sequence(np.asarray(data.sequence), config.val_fraction, config.seed)
    train_rows, val_rows = torch.from_numpy(train_rows), torch.from_numpy(val_rows)
    if config.arch == "lstm":
        inputs = _SequenceInputs(data, labels, device)
    else:
        inputs = _WindowInputs(data, labels, config.window, device)
    train_items, val_items = inputs.items(train_rows), inputs.items(val_rows)
    # the rows each side really holds (a sequence follows its first row when a row split was needed)
    train_rows = torch.zeros_like(train_rows)
    train_rows[inputs.rows(train_items)] = True
    val_rows = torch.zeros_like(val_rows)
    val_rows[inputs.rows(val_items)] = True
    w0, w1 = class_weights(labels[train_rows])
    controller = make_controller(config.arch, checked_groups(config.drop, config.stability), window=config.window, hidden=config.hidden_size)
    controller.set_normalisation(torch.as_tensor(data.features, dtype=torch.float32)[train_rows])
    controller.to(device)
    per_batch = inputs.per_batch(config.batch_size, train_items)
    optimizer = torch.optim.AdamW(controller.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history = {"epoch": [], "train_loss": [], "val_loss": []}
    best = (math.inf, 0, {k: v.clone() for k, v in controller.state_dict().items()})
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        controller.train()
        order = train_items[torch.randperm(len(train_items), generator=generator)]
        total, count = 0.0, 0
        for first in range(0, len(order), per_batch):
            logits, y = inputs.logits(controller, order[first : first + per_batch])
            loss = _weighted_bce(logits, y, w0, w1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
        controller.eval()
        train_loss = total / max(count, 1)
        val_loss = _evaluate(controller, inputs, val_items, w0, w1, per_batch)[0] if len(val_items) else train_loss
        history["epoch"].append(epoch)
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        if config.progress:
            print(f"controller: epoch {epoch} train {train_loss:.4f} val {val_loss:.4f}", file=sys.stderr)
        if val_loss < best[0]:
            best = (val_loss, epoch, {k: v.clone() for k, v in controller.state_dict().items()})
        elif epoch - best[1] >= config.patience:
            break
    controller.load_state_dict(best[2])
    controller.eval()
    if len(val_items):
        _, prob, y_val = _evaluate(controller, inputs, val_items, w0, w1, per_batch)
    else:
        prob, y_val = torch.zeros(0), torch.zeros(0)
    record = {
        "best_epoch": best[1],
        "val_loss": best[0],
        "epochs_run": history["epoch"][-1],
        "class_weights": {"w0": w0, "w1": w1},
        "rows": {"train": int(train_rows.sum()), "val": int(val_rows.sum())},
        "positive_rate": {"train": float(labels[train_rows].mean()),
                          "val": float(labels[val_rows].mean()) if val_rows.any() else None},
        "val_metrics": _metrics(prob.cpu(), y_val.cpu()),
        "seconds": time.perf_counter() - start,
        "history": history,
    }
    return controller.cpu(), record


def plot_losses(history: dict, path, title: str = "TSPD controller") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["train_loss"], label="training")
    ax.plot(history["epoch"], history["val_loss"], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("class-weighted BCE")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def train_controller(config: ControllerTrainConfig) -> dict:
    """`unmask train controller`: load traces, fit, save beside the model (or to `out`), plot. Returns a summary."""
    from unmask.training.traces import load_traces

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    data = load_traces(config.traces)
    if config.out is not None:
        out = Path(config.out)
    else:
        paths = {m.get("model_path") for m in data.meta}
        if len(paths) != 1 or None in paths:
            raise UnmaskError(
                "the traces do not name one model folder to save beside (in-memory model, or several models); pass --out DIR",
                field="out",
            )
        out = default_controller_dir(paths.pop(), config.drop, config.arch, config.stability)
    controller, record = fit_controller(data, config)
    trained_on = [{k: m.get(k) for k in ("path", "model", "model_path", "task", "split", "n", "trajectory", "strategy",
                                          "gen_length", "block_length", "rows", "positives")} for m in data.meta]
    for entry in trained_on:  # trace files written before --trajectory recorded the low_confidence decode
        if entry["trajectory"] is None and str(entry["strategy"] or "").startswith("low_confidence"):
            entry["trajectory"] = "low_confidence"
    settings = {k: v for k, v in asdict(config).items() if k not in ("progress", "plot", "traces", "out")}
    settings["hidden"] = config.hidden_size
    controller.save(out, extra={"trained_on": trained_on, "training": settings, **record})
    if config.plot:
        plot_losses(record["history"], out / PLOT_FILE, title=f"TSPD controller ({controller.arch})")
    return {"out": str(out), "arch": controller.arch, "parameters": controller.describe()["parameters"],
            "groups": list(controller.groups), "best_epoch": record["best_epoch"], "val_loss": record["val_loss"],
            "val_metrics": record["val_metrics"], "seconds": record["seconds"]}

"""TSPD's temporal-spatial controller: the network, its training (`unmask train controller`), save and load.

The controller reads a masked position's features (`unmask.decoding.features`) at the current call
and at the `window - 1` calls before it in the block, and outputs the probability that the
position's top-1 is already its final token. It is an MLP over that window, about 2K parameters,
shared across positions and sequences: the window is its temporal part, the position features
(offsets, distances to decided neighbours, progress in the block) its spatial part.

Training follows the paper's appendix: class-weighted BCE, w1/w0 from inverse class frequency on
the training split, AdamW (lr 1e-3, weight decay 1e-2). Added: features are standardised with the
training split's mean and std (stored in the controller), the validation split holds whole
decodes (rows of one decode are strongly correlated), and training stops early when the
validation loss has not improved for `patience` epochs, keeping the best epoch.

Departure: the paper's controller is LSTM-like; a window MLP sees the same recent history, costs
one matrix product per call, and keeps the online state to a few feature vectors per position.

A controller is a folder: `controller.safetensors`, `controller.json` (groups, features, window,
what it was trained on, metrics) and `loss.png`. By default it lives beside the model it was
trained for, in `<model_dir>/controller/` (`<model_dir>/controller-drop-GROUP/` for an ablation),
which is where `tspd` looks for it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unmask.decoding.features import FEATURE_GROUPS, FEATURE_NAMES, feature_columns, fill_window, groups_without
from unmask.errors import UnmaskError

CONTROLLER_FORMAT = "unmask-controller/1"
WEIGHTS_FILE = "controller.safetensors"
CONFIG_FILE = "controller.json"
PLOT_FILE = "loss.png"


def default_controller_dir(model_path, drop: str | None = None) -> Path:
    """Where the controller of the model at `model_path` lives (one per dropped group for ablations)."""
    return Path(model_path) / ("controller" if drop is None else f"controller-drop-{drop}")


class Controller(nn.Module):
    """P(top-1 is final) for each position from a window of its features.

    Input: (..., K, len(FEATURE_NAMES)) with K >= `window`, newest call first, every feature
    (the controller picks the columns of its groups). Output of `forward`: logits (...).
    """

    def __init__(self, groups=tuple(FEATURE_GROUPS), window: int = 3, hidden: int = 32):
        super().__init__()
        self.groups = tuple(groups)
        self.window = int(window)
        self.hidden = int(hidden)
        self.columns = feature_columns(self.groups)
        self.register_buffer("column_index", torch.tensor(self.columns, dtype=torch.long), persistent=False)
        width = len(self.columns)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.net = nn.Sequential(
            nn.Linear(self.window * width, self.hidden),
            nn.SiLU(),
            nn.Linear(self.hidden, self.hidden // 2),
            nn.SiLU(),
            nn.Linear(self.hidden // 2, 1),
        )

    @property
    def feature_names(self) -> list[str]:
        return [FEATURE_NAMES[i] for i in self.columns]

    def set_normalisation(self, windows: torch.Tensor) -> None:
        """Standardise with the statistics of the current call's features in `windows` (N, K, F_all)."""
        current = windows[:, 0, self.column_index].double()
        self.mean.copy_(current.mean(0).float())
        self.std.copy_(current.std(0).clamp(min=1e-4).float())

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        x = windows[..., : self.window, :].index_select(-1, self.column_index)
        x = (x - self.mean) / self.std
        return self.net(x.flatten(-2)).squeeze(-1)

    def probability(self, windows: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(windows.float()))

    def describe(self) -> dict:
        return {
            "format": CONTROLLER_FORMAT,
            "groups": list(self.groups),
            "features": self.feature_names,
            "window": self.window,
            "hidden": self.hidden,
            "parameters": sum(p.numel() for p in self.parameters()),
        }

    def save(self, folder, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": CONTROLLER_FORMAT})
        (folder / CONFIG_FILE).write_text(json.dumps({**self.describe(), **(extra or {})}, indent=2) + "\n")
        return folder


def load_controller(folder, device=None) -> tuple[Controller, dict]:
    """The controller saved in `folder` and its JSON config. Raises UnmaskError with what to do."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.exists() or not weights.exists():
        raise UnmaskError(
            f"no TSPD controller in {folder} (it needs {CONFIG_FILE} and {WEIGHTS_FILE}); train one with "
            "`unmask train collect-traces` then `unmask train controller`, or pass tspd:controller=PATH",
            field="controller",
        )
    try:
        config = json.loads(config_file.read_text())
        if config.get("format") != CONTROLLER_FORMAT:
            raise ValueError(f"format {config.get('format')!r}")
        unknown = set(config["groups"]) - set(FEATURE_GROUPS)
        if unknown:
            raise ValueError(f"unknown feature groups {sorted(unknown)}")
        controller = Controller(config["groups"], window=config["window"], hidden=config["hidden"])
        if controller.feature_names != list(config["features"]):
            raise ValueError("its features differ from the ones this version computes")
        controller.load_state_dict(load_file(str(weights)))
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError, json.JSONDecodeError) as exc:
        raise UnmaskError(f"the controller in {folder} is unusable ({exc}); train it again with `unmask train controller`",
                          field="controller") from None
    controller.eval()
    if device is not None:
        controller.to(device)
    return controller, config


# ---------------------------------------------------------------------------------------------
# training


def build_windows(features: np.ndarray | torch.Tensor, prev: np.ndarray | torch.Tensor, window: int) -> torch.Tensor:
    """(N, window, F) inputs: each row and the rows of its previous `window - 1` calls (missing: repeated)."""
    features = torch.as_tensor(features, dtype=torch.float32)
    prev = torch.as_tensor(prev, dtype=torch.long)
    previous = []
    index = torch.arange(features.shape[0])
    for _ in range(window - 1):
        index = torch.where(index >= 0, prev[index.clamp(min=0)], index)
        step = features[index.clamp(min=0)]
        previous.append(torch.where((index >= 0)[:, None], step, torch.full_like(step, float("nan"))))
    if not previous:
        return features[:, None]
    return fill_window(features, torch.stack(previous, dim=1))


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
    window: int = 3  # calls seen: this one and window - 1 before it
    hidden: int = 32
    epochs: int = 200
    patience: int = 10  # epochs without a better validation loss before stopping
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-2
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    plot: bool = True
    progress: bool = True

    def validate(self) -> None:
        if self.drop is not None and self.drop not in FEATURE_GROUPS:
            raise UnmaskError(f"drop must be one of {', '.join(FEATURE_GROUPS)}, got {self.drop!r}", field="drop")
        for name in ("window", "hidden", "epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise UnmaskError(f"{name} must be a positive integer, got {getattr(self, name)}", field=name)
        if self.hidden < 2:
            raise UnmaskError(f"hidden must be >= 2, got {self.hidden}", field="hidden")
        if self.lr <= 0 or self.weight_decay < 0:
            raise UnmaskError("lr must be > 0 and weight_decay >= 0", field="lr")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UnmaskError(f"val_fraction must be in [0, 1), got {self.val_fraction}", field="val_fraction")


def _weighted_bce(logits, labels, w0: float, w1: float) -> torch.Tensor:
    weight = torch.where(labels > 0.5, torch.full_like(labels, w1), torch.full_like(labels, w0))
    return (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weight).mean()


@torch.no_grad()
def _evaluate(controller, windows, labels, w0, w1, batch_size: int) -> tuple[float, torch.Tensor]:
    logits = torch.cat([controller(windows[i : i + batch_size]) for i in range(0, len(labels), batch_size)])
    return float(_weighted_bce(logits, labels, w0, w1)), torch.sigmoid(logits)


def _metrics(prob: torch.Tensor, labels: torch.Tensor) -> dict:
    out = {"accuracy": float(((prob > 0.5) == (labels > 0.5)).float().mean()) if len(labels) else float("nan")}
    for tau in (0.5, 0.9):
        picked = prob > tau
        hits = (picked & (labels > 0.5)).sum()
        out[f"precision@{tau}"] = float(hits / picked.sum()) if picked.any() else float("nan")
        out[f"recall@{tau}"] = float(hits / (labels > 0.5).sum()) if (labels > 0.5).any() else float("nan")
    return out


def fit_controller(data, config: ControllerTrainConfig) -> tuple[Controller, dict]:
    """Train a controller on `TraceData`; returns it (best validation epoch) and the training record."""
    config.validate()
    if len(data) == 0:
        raise UnmaskError("the traces hold no rows; collect traces from more prompts")
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    windows = build_windows(data.features, data.prev, config.window)
    labels = torch.as_tensor(data.labels, dtype=torch.float32)
    train_rows, val_rows = split_by_sequence(np.asarray(data.sequence), config.val_fraction, config.seed)
    train_rows, val_rows = torch.from_numpy(train_rows), torch.from_numpy(val_rows)
    w0, w1 = class_weights(labels[train_rows])
    controller = Controller(groups_without(config.drop), window=config.window, hidden=config.hidden)
    controller.set_normalisation(windows[train_rows])
    controller.to(device)
    x_train, y_train = windows[train_rows].to(device), labels[train_rows].to(device)
    x_val, y_val = windows[val_rows].to(device), labels[val_rows].to(device)
    optimizer = torch.optim.AdamW(controller.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history = {"epoch": [], "train_loss": [], "val_loss": []}
    best = (math.inf, 0, {k: v.clone() for k, v in controller.state_dict().items()})
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        controller.train()
        order = torch.randperm(len(y_train), generator=generator).to(device)
        total, count = 0.0, 0
        for first in range(0, len(order), config.batch_size):
            batch = order[first : first + config.batch_size]
            loss = _weighted_bce(controller(x_train[batch]), y_train[batch], w0, w1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
        controller.eval()
        train_loss = total / max(count, 1)
        val_loss = _evaluate(controller, x_val, y_val, w0, w1, config.batch_size)[0] if len(y_val) else train_loss
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
    _, prob = _evaluate(controller, x_val, y_val, w0, w1, config.batch_size) if len(y_val) else (0.0, torch.zeros(0))
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
        out = default_controller_dir(paths.pop(), config.drop)
    controller, record = fit_controller(data, config)
    trained_on = [{k: m.get(k) for k in ("path", "model", "model_path", "task", "split", "n", "strategy", "gen_length",
                                          "block_length", "rows", "positives")} for m in data.meta]
    settings = {k: v for k, v in asdict(config).items() if k not in ("progress", "plot", "traces", "out")}
    controller.save(out, extra={"trained_on": trained_on, "training": settings, **record})
    if config.plot:
        plot_losses(record["history"], out / PLOT_FILE)
    return {"out": str(out), "parameters": controller.describe()["parameters"], "groups": list(controller.groups),
            "best_epoch": record["best_epoch"], "val_loss": record["val_loss"], "val_metrics": record["val_metrics"]}

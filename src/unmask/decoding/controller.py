"""TSPD's controller networks: the window MLP and the recurrent (LSTM) controller, saved and loaded.

Inference code (`tspd`) reads controllers from here; their training lives in
`unmask.training.controller` (`unmask train controller`), which this module never imports.
A controller maps a masked position's features (`unmask.decoding.features`) at the calls of its
block so far to the probability that its top-1 is already its final token; see the training
module's docstring for the architectures, the supervision and the folder layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unmask.decoding.features import (
    FEATURE_GROUPS,
    FEATURE_NAMES,
    PAPER_GROUPS,
    controller_groups,
    feature_columns,
    fill_window,
)
from unmask.errors import UnmaskError

CONTROLLER_FORMAT = "unmask-controller/1"
ARCHITECTURES = ("mlp", "lstm")
DEFAULT_HIDDEN = {"mlp": 32, "lstm": 16}
WEIGHTS_FILE = "controller.safetensors"
CONFIG_FILE = "controller.json"
PLOT_FILE = "loss.png"


def default_controller_dir(model_path, drop: str | None = None, arch: str = "lstm", stability: bool = False) -> Path:
    """Where the controller of the model at `model_path` lives: `controller/` for the recurrent one
    over the paper's features (the default), `controller-mlp/` for the window MLP, each with
    `-stability` when it also reads the stability features and `-drop-GROUP` for an ablation.
    (Folders written before the LSTM existed hold an MLP in `controller/`; the loader builds
    whatever a folder's controller.json names.)"""
    name = "controller" if arch == "lstm" else f"controller-{arch}"
    if stability:
        name += "-stability"
    if drop is not None:
        name += f"-drop-{drop}"
    return Path(model_path) / name


def checked_groups(drop: str | None, stability: bool) -> tuple[str, ...]:
    """`controller_groups(drop, stability)`, with a bad combination as a one-line UnmaskError on `drop`."""
    try:
        return controller_groups(drop, stability)
    except ValueError as exc:
        raise UnmaskError(str(exc), field="drop") from None


class _ControllerBase(nn.Module):
    """What both architectures share: the feature columns of their groups, standardisation, describe, save."""

    arch = ""
    recurrent = False

    def __init__(self, groups, window: int, hidden: int):
        super().__init__()
        self.groups = tuple(groups)
        self.window = int(window)
        self.hidden = int(hidden)
        self.columns = feature_columns(self.groups)
        self.register_buffer("column_index", torch.tensor(self.columns, dtype=torch.long), persistent=False)
        width = len(self.columns)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    @property
    def feature_names(self) -> list[str]:
        return [FEATURE_NAMES[i] for i in self.columns]

    def set_normalisation(self, windows: torch.Tensor) -> None:
        """Standardise with the statistics of the current call's features: `windows` (N, K, F_all) or rows (N, F_all)."""
        windows = torch.as_tensor(windows)
        current = (windows[:, 0] if windows.dim() == 3 else windows)[:, self.column_index].double()
        self.mean.copy_(current.mean(0).float())
        self.std.copy_(current.std(0).clamp(min=1e-4).float())

    def _standardised(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().index_select(-1, self.column_index) - self.mean) / self.std

    def row_logits(self, features, prev) -> torch.Tensor:
        """Logits of trace rows (N, F_all) whose earlier calls in the block are linked by `prev` (a trace file's columns)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "format": CONTROLLER_FORMAT,
            "arch": self.arch,
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


class Controller(_ControllerBase):
    """The window MLP (`arch` mlp): P(top-1 is final) for each position from a window of its features.

    Input: (..., K, len(FEATURE_NAMES)) with K >= `window`, newest call first, every feature
    (the controller picks the columns of its groups). Output of `forward`: logits (...).
    """

    arch = "mlp"
    recurrent = False

    def __init__(self, groups=PAPER_GROUPS, window: int = 3, hidden: int = DEFAULT_HIDDEN["mlp"]):
        super().__init__(groups, window, hidden)
        width = len(self.columns)
        self.net = nn.Sequential(
            nn.Linear(self.window * width, self.hidden),
            nn.SiLU(),
            nn.Linear(self.hidden, self.hidden // 2),
            nn.SiLU(),
            nn.Linear(self.hidden // 2, 1),
        )

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        x = self._standardised(windows[..., : self.window, :])
        return self.net(x.flatten(-2)).squeeze(-1)

    def probability(self, windows: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(windows.float()))

    def row_logits(self, features, prev) -> torch.Tensor:
        return self.forward(build_windows(features, prev, self.window).to(self.mean.device))


class RecurrentController(_ControllerBase):
    """The recurrent controller (`arch` lstm): an LSTM cell over a position's calls in its block.

    At each call of the block the cell reads the position's standardised features (the columns of
    its groups) and updates the hidden state (h, c); a linear read-out of h gives the logit of
    P(top-1 is final). The state is zero before the position's first call of its block. With the
    14 features and hidden 16: 4 * 16 * (14 + 16 + 2) + 17 = 2,065 parameters.

    `step` is one call (online, `tspd`); `forward` runs whole sequences (training); both go
    through the same `nn.LSTMCell`.
    """

    arch = "lstm"
    recurrent = True

    def __init__(self, groups=PAPER_GROUPS, hidden: int = DEFAULT_HIDDEN["lstm"]):
        # window 1: the input is this call's features only; the hidden state carries the earlier calls
        super().__init__(groups, 1, hidden)
        self.cell = nn.LSTMCell(len(self.columns), self.hidden)
        self.head = nn.Linear(self.hidden, 1)

    def initial_state(self, shape, device=None) -> dict[str, torch.Tensor]:
        """Zero (h, c), each (*shape, hidden): the state before a position's first call of its block."""
        device = self.mean.device if device is None else device
        return {"h": torch.zeros(*shape, self.hidden, device=device), "c": torch.zeros(*shape, self.hidden, device=device)}

    def step(self, features: torch.Tensor, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One call: features (..., F_all) and the state before it (..., hidden) -> logits (...), the state after."""
        lead = features.shape[:-1]
        x = self._standardised(features).reshape(-1, len(self.columns))
        h, c = self.cell(x, (state["h"].reshape(-1, self.hidden), state["c"].reshape(-1, self.hidden)))
        logits = self.head(h).squeeze(-1)
        return logits.reshape(lead), {"h": h.reshape(*lead, self.hidden), "c": c.reshape(*lead, self.hidden)}

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """sequences (N, T, F_all), oldest call first, each from its block's first call -> logits (N, T).

        Padding after a sequence's end does not change its logits (the cell only looks back).
        """
        state = self.initial_state(sequences.shape[:1], sequences.device)
        logits = []
        for t in range(sequences.shape[1]):
            out, state = self.step(sequences[:, t], state)
            logits.append(out)
        return torch.stack(logits, dim=1) if logits else sequences.new_zeros(sequences.shape[0], 0)

    def row_logits(self, features, prev) -> torch.Tensor:
        chains = Chains(features, prev)
        logits = self.forward(chains.padded().to(self.mean.device))
        return logits[chains.chain.to(logits.device), chains.depth.to(logits.device)]


def make_controller(arch: str, groups, window: int = 3, hidden: int | None = None):
    """A fresh controller of architecture `arch` (mlp or lstm); `window` is the MLP's only."""
    if arch not in ARCHITECTURES:
        raise UnmaskError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}", field="arch")
    hidden = DEFAULT_HIDDEN[arch] if hidden is None else hidden
    if arch == "lstm":
        return RecurrentController(groups, hidden=hidden)
    return Controller(groups, window=window, hidden=hidden)


def load_controller(folder, device=None) -> tuple[Controller | RecurrentController, dict]:
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
        arch = config.get("arch", "mlp")  # folders written before the LSTM existed are MLPs
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {arch!r}")
        controller = make_controller(arch, config["groups"], window=config["window"], hidden=config["hidden"])
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


class Chains:
    """Trace rows grouped into sequences by their `prev` links: one per (decode, block, position).

    Row i is call `depth[i]` (0 at the block's first call) of sequence `chain[i]`; `padded()` gives
    the (n_chains, max_len, F) input of the recurrent controller, oldest call first, zeros after
    a sequence's end.
    """

    def __init__(self, features, prev):
        self.features = torch.as_tensor(features, dtype=torch.float32)
        prev = np.asarray(prev, dtype=np.int64)
        n = prev.shape[0]
        if n and (prev >= np.arange(n)).any():
            raise UnmaskError("trace rows must link to earlier rows (prev < row); the trace file is malformed")
        depth = np.zeros(n, dtype=np.int64)
        head = np.arange(n)
        current = prev.copy()
        while True:
            linked = current >= 0
            if not linked.any():
                break
            depth[linked] += 1
            head[linked] = current[linked]
            current[linked] = prev[current[linked]]
        heads = np.flatnonzero(prev < 0)
        number = np.full(n, -1, dtype=np.int64)
        number[heads] = np.arange(len(heads))
        self.chain = torch.from_numpy(number[head])
        self.depth = torch.from_numpy(depth)
        self.count = len(heads)
        self.length = torch.zeros(self.count, dtype=torch.long)
        if n:
            self.length.scatter_reduce_(0, self.chain, self.depth + 1, reduce="amax")
            if int(self.length.sum()) != n:
                raise UnmaskError("two trace rows link to the same earlier row; the trace file is malformed")
        self.head = torch.from_numpy(heads)

    def padded(self, chains: torch.Tensor | None = None) -> torch.Tensor:
        """(len(chains), longest, F) features, oldest call first (all chains when None)."""
        if chains is None:
            chains = torch.arange(self.count)
        slot = torch.full((self.count,), -1, dtype=torch.long)
        slot[chains] = torch.arange(len(chains))
        longest = int(self.length[chains].max()) if len(chains) else 0
        out = torch.zeros(len(chains), longest, self.features.shape[1])
        rows = (slot[self.chain] >= 0).nonzero().squeeze(1) if len(self.chain) else torch.zeros(0, dtype=torch.long)
        out[slot[self.chain[rows]], self.depth[rows]] = self.features[rows]
        return out

    def rows_of(self, chains: torch.Tensor) -> torch.Tensor:
        """Row indices of `chains`, ordered by (position in `chains`, depth)."""
        slot = torch.full((self.count,), -1, dtype=torch.long)
        slot[chains] = torch.arange(len(chains))
        rows = (slot[self.chain] >= 0).nonzero().squeeze(1)
        key = slot[self.chain[rows]] * (int(self.depth.max()) + 1 if len(self.depth) else 1) + self.depth[rows]
        return rows[key.argsort()]

"""TSPD: commit the positions a learned controller judges converged, optionally with CE."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from unmask.decoding.controller import ARCHITECTURES, checked_groups
from unmask.decoding.features import FeatureTracker
from unmask.decoding.policies.base import Decision, Policy, PolicyConfig
from unmask.decoding.policies.ce import CEConfig, ConfidenceExtrapolation, with_progress
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError


@dataclass
class TSPDConfig(PolicyConfig):
    tau: float = 0.9  # commit a masked position when the controller's P(converged) exceeds tau
    controller: str | None = None  # controller folder; default <model_dir>/controller[-mlp][-stability][-drop-GROUP]
    arch: str = "lstm"  # which controller beside the model: lstm (controller/, the paper's) or mlp (controller-mlp/)
    drop: str | None = None  # feature group left out; the controller must have been trained without it
    ce: bool = False  # add CE's look-ahead commits and holds (at CE's default settings)
    # departure (off in the paper's setting): a controller that also reads the stability features
    # (the top-1's unchanged streak and the flip flag; controller-stability/ beside the model)
    stability: bool = False
    # departure (off in the paper's setting): also commit masked positions whose confidence reaches
    # conf_tau, Fast-dLLM's threshold rule beside the controller's
    conf_tau: float | None = None

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.tau < 1.0:
            raise UnmaskError(f"tau must be in [0, 1), got {self.tau}", field="tau")
        if self.arch not in ARCHITECTURES:
            raise UnmaskError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}", field="arch")
        checked_groups(self.drop, self.stability)
        if self.conf_tau is not None and not 0.0 < self.conf_tau <= 1.0:
            raise UnmaskError(f"conf_tau must be in (0, 1], got {self.conf_tau}", field="conf_tau")


@register_policy
class TSPD(Policy):
    """Temporal-Spatial Parallel Decoding (arXiv 2605.30753): a tiny learned controller decides convergence.

    Each call, every position of the block gets its trajectory features (the paper's: confidence
    and margin, entropy, momentum, position; `unmask.decoding.features`); the controller
    (`unmask train controller`, about 2K parameters) maps them, with the position's earlier calls
    in the block, to the probability that its top-1 is already final. Masked positions with
    probability above `tau` are committed; if none is, the most probable one. With `ce=true`,
    Confidence Extrapolation adds its safe look-ahead commits and holds back oscillating or
    under-confident positions (see `ce`).

    Architecture: the one the controller folder records (`arch` in controller.json; see
    `unmask.training.controller`). `lstm` (the default, the paper's "LSTM-like" model) is an LSTM
    cell (hidden 16) run one step per call: its hidden state is kept in the policy state per
    (sequence row, generation position), is zero at the position's first call of its block, and
    advances at each call while the position's block is the current one. `arch=mlp` (a departure)
    reads the MLP over the features of this call and the `window - 1` before it; measured beside
    the LSTM in docs/methods.md.

    Supervision: `unmask train collect-traces` records, by default, Extremely Greedy Parallel
    trajectories as the paper does (the `oracle` decode: each call commits every masked position
    whose top-1 already equals the one-token-per-call low-confidence output), labelling each
    (call, masked position of the block) 1 iff its top-1 at that call equals its final token;
    `--trajectory low_confidence` records that one-token-per-call reference decode instead. The
    controllers shipped with the built-in model are trained on EGP traces (controller.json,
    `trained_on`, says so).

    The controller is read from `controller=PATH` (whatever its architecture), else from the
    model's folder: `<model_dir>/controller/` (`arch=lstm`, the default) or
    `<model_dir>/controller-mlp/` (`arch=mlp`), with `-stability` appended for `stability=true` and
    `-drop-GROUP` for `drop`. `drop` removes a feature group for the ablation and requires a
    controller trained without exactly that group.
    Per call the overhead is one feature pass and one small MLP or LSTM-cell step over the block.

    Departures, off by default, measured beside the paper's setting in docs/methods.md:
    `conf_tau=P` also commits masked positions whose confidence reaches P (Fast-dLLM's threshold
    rule beside the controller's; CE's holds apply to them too); `stability=true` reads a controller
    that also sees the stability features (the top-1's streak and flip flag), which on EGP traces
    learns that a settled prediction is not final (see `unmask.decoding.features`).
    """

    name = "tspd"
    Config = TSPDConfig
    departures = ("conf_tau", "stability")

    def __init__(self, config: TSPDConfig | None = None, controller=None):
        super().__init__(config)
        # a controller object given here (tests, notebooks) takes precedence over any folder
        self.controller = controller
        self._given = controller is not None
        self._loaded: tuple | None = None  # (folder, mtime) of the controller loaded from disk
        self.extrapolation = ConfidenceExtrapolation(CEConfig()) if self.config.ce else None
        self.tracker = FeatureTracker(window=getattr(controller, "window", 1))

    def controller_folder(self, model) -> Path:
        from unmask.decoding.controller import default_controller_dir

        if self.config.controller:
            return Path(self.config.controller).expanduser()
        if not getattr(model, "path", None):
            raise UnmaskError(
                f"model {getattr(model, 'name', '?')} has no folder to find a TSPD controller in; "
                "pass tspd:controller=PATH",
                field="controller",
            )
        return default_controller_dir(model.path, self.config.drop, self.config.arch, self.config.stability)

    def unavailable(self, model) -> str | None:
        if self._given:
            return None
        from unmask.decoding.controller import CONFIG_FILE

        try:
            folder = self.controller_folder(model)
        except UnmaskError as exc:
            return str(exc)
        if not (folder / CONFIG_FILE).exists():
            return f"no TSPD controller in {folder}; train one with `unmask train collect-traces` and `unmask train controller`"
        return None

    def prepare(self, model, prompts, decode_config, gen_lengths=None) -> None:
        if not self._given:
            from unmask.decoding.controller import CONFIG_FILE, load_controller

            folder = self.controller_folder(model)
            stamp = (str(folder), os.path.getmtime(folder / CONFIG_FILE) if (folder / CONFIG_FILE).exists() else None)
            if self._loaded != stamp:
                self.controller, _ = load_controller(folder)
                self._loaded = stamp
        self._check_groups()
        if hasattr(self.controller, "to"):
            self.controller.to(model.device)
        self.tracker = FeatureTracker(window=self.controller.window)

    def _check_groups(self) -> None:
        cfg = self.config
        expected = checked_groups(cfg.drop, cfg.stability)
        trained = tuple(self.controller.groups)
        if set(trained) != set(expected):
            # (training flag, strategy option) for each setting that picks the groups
            chosen = ([("--stability", "stability=true")] if cfg.stability else []) + \
                     ([(f"--drop {cfg.drop}", f"drop={cfg.drop}")] if cfg.drop else [])
            flags = "".join(" " + flag for flag, _ in chosen)
            asked = ",".join(option for _, option in chosen) or "the paper setting"
            raise UnmaskError(
                f"the TSPD controller reads the feature groups {', '.join(trained)}, but this strategy "
                f"({asked}) needs {', '.join(expected)}; train one with "
                f"`unmask train controller{flags}` or change stability/drop",
                field="drop",
            )

    def init_state(self, batch_size, gen_length, device):
        state = {"features": self.tracker.init_state(batch_size, gen_length, device)}
        if getattr(self.controller, "recurrent", False):
            # the recurrent controller's (h, c) per (row, generation position)
            state["controller"] = self.controller.initial_state((batch_size, gen_length), device)
        if self.extrapolation is not None:
            state["ce"] = self.extrapolation.init_state(batch_size, gen_length, device)
        return state

    @torch.no_grad()
    def controller_probability(self, view, state, observation) -> torch.Tensor:
        """P(top-1 is final) of every block position at this call (b, block).

        The MLP reads this call's window. The recurrent controller takes each position's (h, c)
        from the state (zero at the block's first call), advances it by this call's features and
        stores it back, so every call of a block advances each of its positions exactly once.
        """
        if not getattr(self.controller, "recurrent", False):
            return self.controller.probability(observation.windows)
        rows, pos = view.rows[:, None], view.positions
        first = (view.block_step == 0)[:, None, None]
        before = {k: buf[rows, pos].masked_fill(first, 0.0) for k, buf in state["controller"].items()}
        logits, after = self.controller.step(observation.features, before)
        for k, buf in state["controller"].items():
            buf[rows, pos] = after[k].to(buf.dtype)
        return torch.sigmoid(logits)

    def base_commits(self, view, prob: torch.Tensor) -> torch.Tensor:
        """Masked positions the controller trusts (P(final) > tau), or, with `conf_tau`, confident enough."""
        base = view.masked & (prob > self.config.tau)
        if self.config.conf_tau is not None:
            base = base | (view.masked & (view.confidence >= self.config.conf_tau))
        return base

    def decide(self, view, state):
        if self.controller is None:
            raise UnmaskError("tspd has no controller; decode through `generate` so that it is loaded", field="controller")
        observation = self.tracker.update(view, state["features"])
        prob = self.controller_probability(view, state, observation)  # (b, block)
        base = self.base_commits(view, prob)
        if self.extrapolation is None:
            return Decision(commit=with_progress(base, prob, view.masked))
        verdict = self.extrapolation.verdict(view, state["ce"], observation)
        commit = (base | verdict.lookahead) & ~verdict.hold
        commit = with_progress(commit, prob, view.masked)
        events = {
            "ce_lookahead": (commit & verdict.lookahead & ~base).sum(-1).float(),
            "ce_holds": (base & verdict.hold & ~commit).sum(-1).float(),
        }
        return Decision(commit=commit, events=events)

"""learned_drafts: commit what a controller trained on oracle labels trusts, draft the rest in its order, verify."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.decoding.policies.base import Decision
from unmask.decoding.policies.ce import with_progress
from unmask.decoding.policies.psd import hierarchical_depth, nested_drafts
from unmask.decoding.policies.tspd import TSPD, TSPDConfig
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError

ORDERS = ("controller", "confidence", "position")


@dataclass
class LearnedDraftsConfig(TSPDConfig):
    # commit a masked position when the controller's P(final) exceeds tau or its confidence reaches
    # conf_tau (TSPD's rule and Fast-dLLM's, united); `tau` is also the controller's bar for `tspd`
    conf_tau: float | None = 0.9
    # its controller also reads the stability features (controller-stability/ beside the model):
    # with the united rule and verification it decodes in fewer calls than the paper's feature set
    stability: bool = True
    depth: int = 3  # drafts per call (levels of one position each), verified in the same call
    order: str = "controller"  # draft order: controller (P(final)), confidence (PSD's) or position (left to right)

    def validate(self) -> None:
        super().validate()
        if self.ce:
            raise UnmaskError("learned_drafts has no CE variant; use tspd:ce=true for that", field="ce")
        if not 0 <= self.depth <= 16:
            raise UnmaskError(f"depth must be between 0 and 16 drafts, got {self.depth}", field="depth")
        if self.order not in ORDERS:
            raise UnmaskError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}", field="order")


@register_policy
class LearnedDrafts(TSPD):
    """unmask's own policy: a controller trained on oracle labels, its mistakes caught by verification.

    Each call, TSPD's controller (the LSTM shipped beside the model in `controller-stability/`,
    trained on the oracle's own trajectories: label 1 where a position's top-1 already is its
    final token; it reads the paper's features and the stability ones) gives every position
    of the block P(final). Masked positions with P(final) > `tau` or confidence >= `conf_tau` are
    committed (at least one per call: the most probable). The positions still masked are ranked by
    P(final) and drafted one per level, as PSD drafts: draft k fills the k best with their current
    top-1, and the same model call that scores the committed block scores the `depth` drafts too.
    The deepest draft whose every level the model confirms (the token a level adds equals the
    top-1 predicted on the level before, where it was still masked) is kept, and its logits serve as
    the next step's forward. A rejected draft token is never committed.

    What it takes from each seed method: TSPD's controller and features, the threshold rule, PSD's
    nested drafts and one-call hierarchical verification. What is new: the controller's P(final)
    both commits and orders the drafts, so verification checks the positions the oracle's labels say
    are most likely already final. `order=confidence` is PSD's order (with the united commit rule);
    `order=position` drafts left to right. `tau`, `conf_tau` and `depth` trade calls for accuracy:
    docs/methods.md gives the measured frontier.

    Needs the controller beside the model (`controller-stability/`; `stability=false` reads
    `controller/`, the paper's feature set), or `controller=PATH`, like `tspd`.
    """

    name = "learned_drafts"
    Config = LearnedDraftsConfig
    departures = ()  # its own policy: conf_tau is part of its rule, not a departure from TSPD's paper

    def decide(self, view, state):
        if self.controller is None:
            raise UnmaskError("learned_drafts has no controller; decode through `generate` so that it is loaded",
                              field="controller")
        cfg = self.config
        observation = self.tracker.update(view, state["features"])
        prob = self.controller_probability(view, state, observation)  # (b, block) P(final)
        commit = with_progress(self.base_commits(view, prob), prob, view.masked)
        if cfg.order == "controller":
            score = prob
        elif cfg.order == "confidence":
            score = view.confidence
        else:  # left to right
            score = -view.positions.float()
        group = torch.ones_like(view.block_step)
        return Decision(commit=commit, drafts=nested_drafts(view, commit, score, group, cfg.depth))

    def accept(self, view, state, candidates, draft_top1, draft_conf):
        depth, _, events = hierarchical_depth(candidates, draft_top1, draft_conf)
        return depth, events

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

ORDERS = ("controller", "confidence", "position", "least_confident")


@dataclass
class LearnedDraftsConfig(TSPDConfig):
    # commit a masked position when the controller's P(final) exceeds tau or its confidence reaches
    # conf_tau (TSPD's rule and Fast-dLLM's, united); `tau` is also the controller's bar for `tspd`
    conf_tau: float | None = 0.9
    # its controller also reads the stability features (controller-stability/ beside the model):
    # with the united rule and verification it decodes in fewer calls than the paper's feature set
    stability: bool = True
    depth: int = 3  # drafts per call (levels of one position each), verified in the same call
    # draft order: controller (P(final)), confidence (PSD's), position (left to right) or
    # least_confident; several joined by "+" draft one chain each, and the deepest confirmed is kept
    order: str = "controller"

    @property
    def orders(self) -> tuple[str, ...]:
        return tuple(self.order.split("+")) if isinstance(self.order, str) else ()

    def validate(self) -> None:
        super().validate()
        if self.ce:
            raise UnmaskError("learned_drafts has no CE variant; use tspd:ce=true for that", field="ce")
        if not 0 <= self.depth <= 16:
            raise UnmaskError(f"depth must be between 0 and 16 drafts, got {self.depth}", field="depth")
        unknown = [o for o in self.orders if o not in ORDERS]
        if not self.orders or unknown or len(set(self.orders)) != len(self.orders):
            raise UnmaskError(f"order must be one of {', '.join(ORDERS)}, or several different ones joined by '+', "
                              f"got {self.order!r}", field="order")
        if len(self.orders) > 1 and self.depth < 2:
            raise UnmaskError(f"several draft orders need depth >= 2 (a chain of one level is a threshold test "
                              f"on one canvas), got depth {self.depth}", field="depth")


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
    `order=position` drafts left to right, `order=least_confident` the least confident first.
    Several orders joined by "+" (`order=controller+position+confidence`) draft one chain each
    from the same committed block, all scored in the same call; each chain is checked alone, and
    the deepest confirmed one is kept (the earliest listed on a tie). Chains fail at different
    places, so more chains mean fewer calls for more rows. `tau`, `conf_tau`, `depth` and the
    orders trade calls, rows and accuracy: docs/methods.md gives the measured frontier.

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
        scores = {"controller": lambda: prob, "confidence": lambda: view.confidence,
                  "position": lambda: -view.positions.float(), "least_confident": lambda: -view.confidence}
        group = torch.ones_like(view.block_step)
        chains = [nested_drafts(view, commit, scores[o](), group, cfg.depth) for o in cfg.orders]
        return Decision(commit=commit, drafts=joined_chains(view, commit, chains, cfg.depth))

    def accept(self, view, state, candidates, draft_top1, draft_conf):
        return deepest_chain(candidates, draft_top1, draft_conf, self.config.depth)


def joined_chains(view, commit: torch.Tensor, chains: list, depth: int) -> torch.Tensor | None:
    """Several chains of nested drafts laid end to end: (batch, C x depth, block), or the first alone.

    Every chain holds `depth` levels when some row leaves `depth` positions or more to draft; a row
    that leaves fewer drafts them in the first chain only, and its later chains repeat the first
    chain's deepest draft, so that it adds no canvas (the loop forwards a row's canvases up to its
    last new one).
    """
    first = chains[0]
    if first is None or len(chains) == 1 or first.shape[1] < depth:
        return first
    short = ((view.masked & ~commit).sum(-1) < depth)[:, None, None]
    rest = [torch.where(short, first[:, -1:].expand_as(c), c) for c in chains[1:]]
    return torch.cat([first, *rest], dim=1)


def deepest_chain(candidates, draft_top1, draft_conf, depth: int):
    """The index (into `candidates`) of the deepest confirmed draft over all chains, and events.

    candidates: (batch, 1 + C x depth, block): the committed block, then C chains of `depth` nested
    drafts. Each chain is checked alone by PSD's hierarchical acceptance against the committed
    block; the deepest confirmed chain wins (the earliest on a tie). A later chain that repeats the
    first chain's deepest draft (a row with fewer positions to draft) confirms nothing.
    """
    n_chains = max(1, (candidates.shape[1] - 1) // depth) if depth else 1
    if n_chains == 1:
        chosen, _, events = hierarchical_depth(candidates, draft_top1, draft_conf)
        return chosen, events
    depths, built = [], 0
    for c in range(n_chains):
        index = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(c * depth + 1, (c + 1) * depth + 1)])
        index = index.to(candidates.device)
        sub = candidates[:, index]
        d, levels, _ = hierarchical_depth(sub, draft_top1[:, index], draft_conf[:, index])
        if c:  # a real chain adds one position per level; a repeat of the first chain's draft confirms nothing
            one_each = ((sub[:, 1:] != sub[:, :-1]).sum(-1) == 1).all(-1)
            d, levels = d * one_each, levels * one_each
        depths.append(d)
        built = built + levels
    depths = torch.stack(depths)  # (C, batch)
    best, chain_of = depths.max(0).values, depths.argmax(0)  # argmax: the earliest chain on a tie
    chosen = best + chain_of * depth  # chain c's level k is candidate c x depth + k (0 when nothing is kept)
    events = {"drafts_built": built.float(), "draft_depth_accepted": best.float(), "draft_tokens_accepted": best.float(),
              "chain_kept_beyond_first": (chain_of > 0).float()}
    return chosen, events

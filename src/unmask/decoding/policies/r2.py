"""R²-dLLM: spatio-temporal redundancy reduction rules."""

from dataclasses import dataclass

import torch

from unmask.decoding.policies.base import Decision, Policy, PolicyConfig, most_confident
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError

CLUSTER_SCORES = ("own", "sum", "mean")
TEMPORAL_STATS = ("last", "mean", "max")


@dataclass
class R2Config(PolicyConfig):
    tau: float = 0.9  # base rule: commit masked positions with confidence >= tau
    tau_s: float = 0.8  # spatial threshold (confidence window, ambiguity, token cluster)
    tau_t: float = 0.8  # temporal threshold on the stable token's confidence
    k: int = 3  # temporal: calls the top-1 must have stayed the same
    temporal_stat: str = "last"  # last | mean | max confidence over those k calls
    conf_window: int = 3  # confidence cluster: window size (0 = off)
    ambiguity_radius: int = 1  # positional ambiguity: neighbours on each side (0 = off)
    cluster_score: str = "own"  # token cluster: i*'s own confidence, or the cluster's sum / mean

    def validate(self) -> None:
        super().validate()
        for name in ("tau", "tau_s", "tau_t"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise UnmaskError(f"{name} must be in (0, 1], got {value}", field=name)
        if not 1 <= self.k <= 64:
            raise UnmaskError(f"k must be between 1 and 64 calls, got {self.k}", field="k")
        if not 0 <= self.conf_window <= 64:
            raise UnmaskError(f"conf_window must be between 0 and 64 positions, got {self.conf_window}", field="conf_window")
        if not 0 <= self.ambiguity_radius <= 16:
            raise UnmaskError(f"ambiguity_radius must be between 0 and 16 positions, got {self.ambiguity_radius}",
                              field="ambiguity_radius")
        if self.temporal_stat not in TEMPORAL_STATS:
            raise UnmaskError(f"temporal_stat must be one of {', '.join(TEMPORAL_STATS)}", field="temporal_stat")
        if self.cluster_score not in CLUSTER_SCORES:
            raise UnmaskError(f"cluster_score must be one of {', '.join(CLUSTER_SCORES)}", field="cluster_score")


def _neighbour(x: torch.Tensor, offset: int, fill) -> torch.Tensor:
    """x shifted so that out[:, i] = x[:, i + offset] (fill outside the block)."""
    out = torch.full_like(x, fill)
    n = x.shape[1]
    if offset > 0:
        out[:, : n - offset] = x[:, offset:]
    elif offset < 0:
        out[:, -offset:] = x[:, : n + offset]
    else:
        out = x.clone()
    return out


@register_policy
class R2(Policy):
    """R²-dLLM (arXiv 2604.18995): commit what is spatially or temporally redundant to wait for.

    After each call, inside the current block, in this order (the public reference code's order):
    0. base: masked positions with confidence >= tau;
    1. confidence cluster (spatial): windows of `conf_window` adjacent positions holding at most one
       committed token whose masked positions have mean confidence >= tau_s commit together;
    2. positional ambiguity (spatial): a token v predicted at i whose probability mass over the
       masked neighbours within `ambiguity_radius`, sum_j p_j(v), reaches tau_s is committed at the
       position where p_j(v) is largest (mass spread over neighbouring places is one confident
       prediction at the best place, not several weak ones);
    3. temporal finalization: a masked position whose top-1 stayed the same for `k` calls with
       confidence (`temporal_stat` of the last k) >= tau_t is committed even below tau_s;
    4. token cluster (spatial): two or more adjacent masked positions with the same top-1 form a
       cluster; only its most confident position i* may be committed: when its score
       (`cluster_score`: its own confidence, or the cluster's summed or mean confidence) exceeds
       tau_s, or when an earlier rule committed it; the others stay masked. Applied last so that no
       other rule re-commits the duplicates.
    At least one position is committed per step (the most confident).

    Choices where the paper is silent: the ambiguity aggregate is the summed probability of the same
    token (capped at 1 by its meaning), restricted to masked neighbours; cluster suppression also
    overrides the base rule, as the paper says "the rest stay masked". Events counted per step:
    `cluster_collapses` (clusters whose duplicates were held back) and `ambiguity_merges`
    (commits made by the ambiguity rule that the base rule would not have made).
    """

    name = "r2"
    Config = R2Config

    def init_state(self, batch_size, gen_length, device):
        # confidence of the top-1 at each of the last k calls, per position (newest last)
        return {"history": torch.full((batch_size, gen_length, self.config.k), float("nan"), device=device)}

    def _temporal_confidence(self, view, state) -> torch.Tensor:
        hist = state["history"]
        rows = view.rows[:, None]
        window = hist[rows, view.positions]  # (b, L, k)
        window = torch.cat([window[..., 1:], view.top1_prob[..., None]], dim=-1)
        hist[rows, view.positions] = window
        stat = self.config.temporal_stat
        if stat == "last":
            return window[..., -1]
        if stat == "max":
            return torch.nan_to_num(window, nan=-1.0).max(-1).values
        return window.nanmean(-1)

    def decide(self, view, state):
        cfg = self.config
        masked, conf, top1 = view.masked, view.confidence, view.top1
        commit = masked & (conf >= cfg.tau)

        if cfg.conf_window > 1 and view.block_length >= cfg.conf_window:
            w = cfg.conf_window
            # per window start s: masked count, committed count, summed masked confidence
            ones = masked.float().unfold(1, w, 1).sum(-1)
            unmasked = (~masked).float().unfold(1, w, 1).sum(-1)
            conf_sum = (conf * masked).unfold(1, w, 1).sum(-1)
            good = (unmasked <= 1) & (ones > 0) & (conf_sum / ones.clamp(min=1) >= cfg.tau_s)  # (b, L-w+1)
            cover = torch.zeros_like(masked)
            for offset in range(w):
                cover[:, offset : offset + good.shape[1]] |= good
            commit |= cover & masked

        merged = torch.zeros_like(masked)
        if cfg.ambiguity_radius > 0:
            probs = torch.softmax(view.logits.float(), dim=-1)
            own = probs.gather(-1, top1[..., None]).squeeze(-1)  # p_i(v_i)
            total = own.clone()
            best = torch.ones_like(masked)
            for offset in range(-cfg.ambiguity_radius, cfg.ambiguity_radius + 1):
                if offset == 0:
                    continue
                # p_{i+offset}(v_i): the neighbour's probability of this position's top-1
                shifted_probs = _neighbour_probs(probs, offset)
                p_nb = shifted_probs.gather(-1, top1[..., None]).squeeze(-1)
                nb_masked = _neighbour(masked, offset, False)
                p_nb = p_nb * nb_masked
                total = total + p_nb
                best &= own >= p_nb
            merged = masked & best & (total.clamp(max=1.0) >= cfg.tau_s) & ~commit
            commit |= merged

        temporal = masked & (view.stable >= cfg.k) & (self._temporal_confidence(view, state) >= cfg.tau_t)
        commit |= temporal

        # token clusters: runs of >= 2 adjacent masked positions with the same top-1
        same_prev = masked & _neighbour(masked, -1, False) & (top1 == _neighbour(top1, -1, -1))
        run_id = torch.cumsum((~same_prev).long(), dim=1) - 1  # (b, L)
        size = torch.zeros_like(run_id).scatter_add_(1, run_id, masked.long())
        in_cluster = masked & (size.gather(1, run_id) >= 2)
        run_max = torch.full_like(conf, -1.0).scatter_reduce_(1, run_id, conf.masked_fill(~masked, -1.0), "amax")
        is_max = in_cluster & (conf >= run_max.gather(1, run_id))
        first = _first_per_run(is_max, run_id)  # i*: the most confident, leftmost on ties
        if cfg.cluster_score == "own":
            score = conf
        else:
            run_sum = torch.zeros_like(conf).scatter_add_(1, run_id, conf * masked)
            score = run_sum.gather(1, run_id)
            if cfg.cluster_score == "mean":
                score = score / size.gather(1, run_id).clamp(min=1)
        cluster_commit = first & (score > cfg.tau_s)
        # the duplicates stay masked; i* keeps whatever another rule decided for it, or clears tau_s
        commit = (commit & ~(in_cluster & ~first)) | cluster_commit
        none = ~commit.any(-1, keepdim=True)
        commit |= most_confident(conf, masked) & none
        tokens = torch.where(temporal & ~(masked & (conf >= cfg.tau)), top1, view.candidate)
        events = {"cluster_collapses": first.sum(-1).float(), "ambiguity_merges": (merged & commit).sum(-1).float(),
                  "temporal_finalizations": (temporal & commit & (conf < cfg.tau)).sum(-1).float()}
        return Decision(commit=commit, tokens=tokens, events=events)


def _neighbour_probs(probs: torch.Tensor, offset: int) -> torch.Tensor:
    """probs shifted along positions so out[:, i] = probs[:, i + offset] (zeros outside the block)."""
    out = torch.zeros_like(probs)
    n = probs.shape[1]
    if offset > 0:
        out[:, : n - offset] = probs[:, offset:]
    else:
        out[:, -offset:] = probs[:, : n + offset]
    return out


def _first_per_run(flags: torch.Tensor, run_id: torch.Tensor) -> torch.Tensor:
    """Keep only the leftmost True of each run."""
    n = flags.shape[1]
    position = torch.arange(n, device=flags.device).expand_as(run_id)
    first_pos = torch.full_like(run_id, n).scatter_reduce_(1, run_id, position.masked_fill(~flags, n), "amin")
    return flags & (position == first_pos.gather(1, run_id))

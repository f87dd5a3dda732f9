"""R²-dLLM: spatio-temporal redundancy reduction rules, in the order its public code applies them."""

from dataclasses import dataclass

import torch

from unmask.decoding.policies.base import Decision, Policy, PolicyConfig, most_confident
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError

CLUSTER_SCORES = ("own", "sum", "mean")
CLUSTER_CHOICES = ("confidence", "mid", "off")
TEMPORAL_STATS = ("last", "mean", "max")


@dataclass
class R2Config(PolicyConfig):
    # every default is the R²-dLLM reference setting (its LLaDA GSM8K script)
    tau: float = 0.9  # base rule: commit masked positions with confidence >= tau (always the most confident)
    tau_s: float = 0.8  # spatial threshold (confidence window and token cluster)
    tau_t: float = 0.8  # temporal threshold on the streak's confidence
    k: int = 3  # temporal: calls in this block the top-1 must have stayed the same
    temporal_stat: str = "last"  # confidence of the streak: this call's (last), its mean or its max
    conf_window: int = 3  # confidence cluster: window size (0 = off)
    window_unmasked: int = 1  # confidence cluster: skip a window holding more decided tokens than this
    token_cluster: str = "confidence"  # which position of a token cluster commits: confidence | mid | off
    # departures (off by default), kept as named options
    ambiguity_radius: int = 0  # positional-ambiguity rule (not in the public code): neighbours on each side
    cluster_score: str = "own"  # what a cluster's chosen position must clear tau_s with: own / sum / mean

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
        if not 0 <= self.window_unmasked <= 64:
            raise UnmaskError(f"window_unmasked must be between 0 and 64 tokens, got {self.window_unmasked}",
                              field="window_unmasked")
        if not 0 <= self.ambiguity_radius <= 16:
            raise UnmaskError(f"ambiguity_radius must be between 0 and 16 positions, got {self.ambiguity_radius}",
                              field="ambiguity_radius")
        if self.temporal_stat not in TEMPORAL_STATS:
            raise UnmaskError(f"temporal_stat must be one of {', '.join(TEMPORAL_STATS)}", field="temporal_stat")
        if self.token_cluster not in CLUSTER_CHOICES:
            raise UnmaskError(f"token_cluster must be one of {', '.join(CLUSTER_CHOICES)}", field="token_cluster")
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

    After each call, inside the current block, four rules run in the order of the public reference
    code, and each sees the commits of the rules before it:
    0. base (Fast-dLLM's threshold rule): masked positions with confidence >= tau, and always the
       most confident one;
    1. confidence cluster (spatial): every window of `conf_window` adjacent positions that, after
       rule 0, holds at most `window_unmasked` decided tokens and whose still-masked positions have
       mean confidence >= tau_s commits those masked positions (windows are judged on the state
       after rule 0, all at once);
    2. token cluster (spatial): on the state after rule 1, a run of >= 2 adjacent still-masked
       positions with the same top-1 is one prediction spread over several places; its most
       confident position (`token_cluster=mid`: its middle one) commits that token when its
       confidence exceeds tau_s. It only adds a commit: the run's other positions stay masked
       unless an earlier rule committed them;
    3. temporal finalization: a position still masked after rules 0-2 whose top-1 has stayed the
       same for `k` consecutive calls of this block commits it when the streak's confidence
       (`temporal_stat`: this call's, or the mean or max over the whole streak) >= tau_t.

    Defaults are the reference's LLaDA setting (tau 0.9, tau_s 0.8, window 3 with at most 1 decided
    token, token cluster by confidence, k 3, tau_t 0.8 on the last confidence). The reference runs
    with the dual KV cache (`--cache dual`); the cache is a decode setting, not the policy's.

    Departures, off by default: `ambiguity_radius=R` adds a positional-ambiguity rule after rule 1
    that the paper describes but the public code does not have (a token whose probability summed over
    the masked neighbours within R reaches tau_s commits at the neighbour where it is most probable);
    `cluster_score=sum|mean` lets a token cluster clear tau_s with its summed or mean confidence.
    Events counted per step (the policy's own, reported beside R_total, never in it):
    `window_commits`, `cluster_commits`, `ambiguity_merges`, `temporal_finalizations` (commits each
    rule added to those of the rules before it).
    """

    name = "r2"
    Config = R2Config
    departures = ("ambiguity_radius", "cluster_score")

    def init_state(self, batch_size, gen_length, device):
        # per position: summed and max confidence of the current streak (the loop's `stable` count
        # says how long it is and restarts it at each block and each change of the top-1)
        return {"sum": torch.zeros(batch_size, gen_length, device=device),
                "max": torch.zeros(batch_size, gen_length, device=device)}

    def _streak_confidence(self, view, state) -> torch.Tensor:
        rows, pos = view.rows[:, None], view.positions
        conf = view.top1_prob
        restart = view.stable <= 1
        total = torch.where(restart, conf, state["sum"][rows, pos] + conf)
        peak = torch.where(restart, conf, torch.maximum(state["max"][rows, pos], conf))
        state["sum"][rows, pos], state["max"][rows, pos] = total, peak
        stat = self.config.temporal_stat
        if stat == "last":
            return conf
        if stat == "max":
            return peak
        return total / view.stable.clamp(min=1)

    def decide(self, view, state):
        cfg = self.config
        masked, conf, top1 = view.masked, view.confidence, view.top1
        streak_conf = self._streak_confidence(view, state)

        # 0. base: threshold, and the most confident position always
        base = masked & (conf >= cfg.tau) | most_confident(conf, masked)
        commit = base.clone()

        # 1. confidence windows, judged on the state after the base rule
        window_commit = torch.zeros_like(masked)
        if cfg.conf_window > 0 and view.block_length >= cfg.conf_window:
            w = cfg.conf_window
            open_ = masked & ~commit
            open_n = open_.float().unfold(1, w, 1).sum(-1)  # (b, L-w+1) still-masked per window
            decided_n = w - open_n
            conf_sum = (conf * open_).unfold(1, w, 1).sum(-1)
            good = (decided_n <= cfg.window_unmasked) & (open_n > 0) & (conf_sum >= cfg.tau_s * open_n)
            cover = torch.zeros_like(masked)
            for offset in range(w):
                cover[:, offset : offset + good.shape[1]] |= good
            window_commit = cover & open_
            commit |= window_commit

        merged = torch.zeros_like(masked)
        if cfg.ambiguity_radius > 0:
            merged = self._ambiguity(view, masked & ~commit)
            commit |= merged

        # 2. token clusters among the positions still masked
        cluster_commit = torch.zeros_like(masked)
        if cfg.token_cluster != "off":
            cluster_commit = self._token_clusters(masked & ~commit, conf, top1) & ~commit
            commit |= cluster_commit

        # 3. temporal finalization of what is still masked
        temporal = masked & ~commit & (view.stable >= cfg.k) & (streak_conf >= cfg.tau_t)
        commit |= temporal

        # base and window commits write the candidate (the sampled token under a temperature);
        # token clusters and temporal finalization write the un-noised top-1, as the reference does
        tokens = torch.where(cluster_commit | temporal, top1, view.candidate)
        events = {"window_commits": window_commit.sum(-1).float(), "cluster_commits": cluster_commit.sum(-1).float(),
                  "ambiguity_merges": merged.sum(-1).float(), "temporal_finalizations": temporal.sum(-1).float()}
        return Decision(commit=commit, tokens=tokens, events=events)

    def _token_clusters(self, open_: torch.Tensor, conf: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
        """The chosen position of every run of >= 2 adjacent open positions sharing a top-1, if it clears tau_s."""
        cfg = self.config
        n = open_.shape[1]
        same_prev = open_ & _neighbour(open_, -1, False) & (top1 == _neighbour(top1, -1, -1))
        run_id = torch.cumsum((~same_prev).long(), dim=1) - 1  # (b, L): runs of open equal-top-1 positions
        size = torch.zeros_like(run_id).scatter_add_(1, run_id, open_.long()).gather(1, run_id)
        in_cluster = open_ & (size >= 2)
        position = torch.arange(n, device=open_.device).expand_as(run_id)
        if cfg.token_cluster == "mid":
            start = torch.full_like(run_id, n).scatter_reduce_(1, run_id, position.masked_fill(~open_, n), "amin")
            chosen = in_cluster & (position == start.gather(1, run_id) + size // 2)
        else:  # the most confident, the leftmost on ties
            run_max = torch.full_like(conf, -1.0).scatter_reduce_(1, run_id, conf.masked_fill(~open_, -1.0), "amax")
            is_max = in_cluster & (conf >= run_max.gather(1, run_id))
            first = torch.full_like(run_id, n).scatter_reduce_(1, run_id, position.masked_fill(~is_max, n), "amin")
            chosen = is_max & (position == first.gather(1, run_id))
        if cfg.cluster_score == "own":
            score = conf
        else:
            score = torch.zeros_like(conf).scatter_add_(1, run_id, conf * open_).gather(1, run_id)
            if cfg.cluster_score == "mean":
                score = score / size.clamp(min=1)
        return chosen & (score > cfg.tau_s)

    def _ambiguity(self, view, open_: torch.Tensor) -> torch.Tensor:
        """Positional ambiguity (option): spread mass of one token committed once at its best place."""
        probs = torch.softmax(view.logits.float(), dim=-1)
        top1 = view.top1
        own = probs.gather(-1, top1[..., None]).squeeze(-1)  # p_i(v_i)
        total = own.clone()
        best = torch.ones_like(open_)
        for offset in range(-self.config.ambiguity_radius, self.config.ambiguity_radius + 1):
            if offset == 0:
                continue
            # p_{i+offset}(v_i): the open neighbour's probability of this position's top-1
            p_nb = _neighbour_probs(probs, offset).gather(-1, top1[..., None]).squeeze(-1)
            p_nb = p_nb * _neighbour(open_, offset, False)
            total = total + p_nb
            best &= own >= p_nb
        return open_ & best & (total.clamp(max=1.0) >= self.config.tau_s)


def _neighbour_probs(probs: torch.Tensor, offset: int) -> torch.Tensor:
    """probs shifted along positions so out[:, i] = probs[:, i + offset] (zeros outside the block)."""
    out = torch.zeros_like(probs)
    n = probs.shape[1]
    if offset > 0:
        out[:, : n - offset] = probs[:, offset:]
    else:
        out[:, -offset:] = probs[:, : n + offset]
    return out

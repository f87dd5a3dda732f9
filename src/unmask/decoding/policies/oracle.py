import torch

from unmask.decoding.policies.base import Decision, Policy, most_confident
from unmask.decoding.registry import register_policy


@register_policy
class Oracle(Policy):
    """The oracle bound (docs/measurements.md): how far a policy that trusts argmax predictions could go.

    `prepare` runs the reference decode (low_confidence, one token per step, greedy) to get y*.
    Each step then commits every masked position of the block whose current argmax already equals
    y*_i; if none does, the masked position that gives y*_i the highest probability is forced to
    y*_i. The result reproduces y* exactly; its NFE counts only the second decode, since the
    reference is what is being bounded, not a cost the bound pays.
    """

    name = "oracle"

    def __init__(self, config=None):
        super().__init__(config)
        self._targets: torch.Tensor | None = None

    continuous = False  # its reference decode is prepared per batch of prompts

    def prepare(self, model, prompts, decode_config, gen_lengths=None) -> None:
        from unmask.decoding.loop import Decoder
        from unmask.decoding.policies.low_confidence import LowConfidence
        from unmask.decoding.policies.schedule import ScheduledConfig

        # one token per step on every model (docs/measurements.md: the reference decode), Dream's included
        reference = Decoder(model, LowConfidence(ScheduledConfig(schedule="llada")), decode_config).run(
            prompts, gen_lengths=gen_lengths)
        # (batch, canvas) in the generation region's coordinates: a block-diffusion prompt's tail
        # comes first (never committed, so its targets are never read), and a shorter sequence's
        # targets end in mask tokens the loop never reads
        block = decode_config.block_length
        leads = [len(p) % block if model.block_diffusion is not None else 0 for p in prompts]
        rows = [[model.mask_id] * lead + s.tokens for lead, s in zip(leads, reference.sequences)]
        canvas = max(len(r) for r in rows)
        self._targets = torch.tensor([r + [model.mask_id] * (canvas - len(r)) for r in rows], device=model.device)

    def stop_predictions(self, rows, gen_top1):
        # the bound stops where the reference stops and fills exactly y*, whatever the model says now
        return self._targets[rows]

    def decide(self, view, state):
        if self._targets is None:
            raise RuntimeError("oracle.decide called before prepare(); the loop calls prepare first")
        target = self._targets[view.rows][torch.arange(view.batch, device=view.positions.device)[:, None], view.positions]
        agree = view.masked & (view.top1 == target)
        target_prob = torch.log_softmax(view.logits, dim=-1).gather(-1, target[..., None]).squeeze(-1)
        forced = most_confident(target_prob, view.masked) & ~agree.any(-1, keepdim=True)
        return Decision(commit=agree | forced, tokens=target)

"""Block-diffusion fine-tuning (`unmask train sft --block-diffusion`): SDAR's recipe.

A block-diffusion model attends causally across blocks and bidirectionally within one (blocks of
the decode's block length, anchored at the sequence's first position, prompt included), so a
finished block's keys and values never change and the KV cache is exact. SDAR (Cheng et al., 2025)
obtains such a model from an existing one by fine-tuning it under block-wise attention masks; its
public training code does, per sample:

- **two copies**: the noisy sequence and the clean one side by side, each with the sample's own
  position ids. A noisy position sees the noisy positions of its own block and the clean positions
  of strictly earlier blocks; a clean position sees the clean positions of its block and the
  earlier ones; nothing sees the noisy copy from the clean one. So every block of a sample is
  trained at once, each against the clean blocks before it, as decoding sees it;
- **the noise**: one t ~ U(0, 1) per sample, p_mask = (1 - eps) t + eps for every block of it, each
  answer position masked independently with probability p_mask (the prompt never);
- **the answer padded to whole blocks**: EOS up to the end of the block that holds the answer's
  last position (and here, up to the end of the last block of `gen_length` tokens, the region the
  decode fills), those EOS tokens trained like the answer;
- **the loss**: cross-entropy on masked positions of the noisy copy, each weighted 1 / p_mask,
  summed and divided by the number of answer positions (EOS padding included).

Where unmask departs, each kept as in the bidirectional trainer and named there: the t of a batch
are stratified (`TrainConfig.stratified`, the marginal is unchanged); rows are padded to one width
rather than packed (the mask keeps samples apart either way); a row with nothing masked is not
redrawn (it adds zero to the loss); and the optimiser schedule is the trainer's (warmup and cosine
decay), tuned for the built-in model's size, where SDAR fine-tunes billions of parameters at a
constant 1e-5. `docs/training.md` has the built-in block model's commands.
"""

from __future__ import annotations

import torch

from unmask.errors import UnmaskError


def region_mask(attention_mask: torch.Tensor, response_mask: torch.Tensor, gen_length: int,
                block_length: int) -> torch.Tensor:
    """(batch, seq) the response positions inside each row's generation region: its whole blocks
    (anchored at the row's first real position) that hold the prompt's tail and `gen_length`
    tokens; the response columns past them are not part of that row."""
    prompt = attention_mask.sum(1) - response_mask.sum(1)  # real prompt tokens per row
    region = -(-(prompt + gen_length) // block_length) * block_length - prompt  # (batch,)
    offset = (response_mask.long().cumsum(1) - 1).clamp(min=0)  # index within the response columns
    return response_mask & (offset < region[:, None])


def two_copy_mask(position_ids: torch.Tensor, block_length: int) -> torch.Tensor:
    """(batch, 2 seq, 2 seq) which keys each query may see in [noisy copy, clean copy] (see the
    module docstring): noisy -> noisy of its block, noisy -> clean of earlier blocks, clean ->
    clean of its block and earlier ones, clean -> noisy never."""
    blocks = position_ids // block_length
    q, k = blocks[:, :, None], blocks[:, None, :]
    same, earlier = q == k, k < q
    rows, seq = blocks.shape
    mask = torch.zeros((rows, 2 * seq, 2 * seq), dtype=torch.bool, device=blocks.device)
    mask[:, :seq, :seq] = same
    mask[:, :seq, seq:] = earlier
    mask[:, seq:, seq:] = same | earlier
    return mask


def two_copy_logits(model, noisy: torch.Tensor, clean: torch.Tensor, attention_mask: torch.Tensor,
                    block_length: int, keep: torch.Tensor) -> torch.Tensor:
    """Logits (batch, q, vocab) of the noisy copy at `keep` (batch, q) positions, the network run
    once over both copies under `two_copy_mask`."""
    network = model.network
    if not getattr(network, "block_causal", False):
        raise UnmaskError("block-diffusion training needs a network with block-causal attention (a LLaDA-layout one)")
    positions = model.position_ids(attention_mask)
    hidden = network(torch.cat([noisy, clean], 1), position_ids=torch.cat([positions, positions], 1),
                     key_mask=torch.cat([attention_mask, attention_mask], 1), keep=keep, project=False,
                     pair_mask=two_copy_mask(positions, block_length))
    return network.head(hidden)


def make_block_causal(model) -> None:
    """Turn a loaded LLaDA-layout model into its block-diffusion variant (same weights, block-causal
    attention, the exact cache), the starting point of a block-diffusion fine-tune."""
    from unmask.models.llada import LLaDANetwork
    from unmask.models.llada_arch import LLADA_BLOCKS

    if not isinstance(model.network, LLaDANetwork):
        raise UnmaskError(f"--block-diffusion fine-tunes LLaDA-layout networks (the built-in model's); "
                          f"{model.name} is a {model.kind or type(model.network).__name__} model", field="init")
    model.network.config.block_causal = True
    model.block_diffusion = LLADA_BLOCKS
    # its own name in every table (the checkpoint's `unmask_name`): the built-in one's is builtin:block
    model.name = "builtin:block" if model.name == "builtin" else f"{model.name}-block"

"""Settings of one decode, validated once with messages that name the bad field."""

from __future__ import annotations

from dataclasses import dataclass

from unmask.errors import UnmaskError

CACHE_MODES = ("none", "prefix", "dual")
CACHE_CHOICES = ("auto",) + CACHE_MODES  # what a user may ask for; `auto` is resolved per model
CACHE_HELP = ("KV cache mode (default auto: the exact cache of a block-diffusion model, none for a bidirectional "
              "one, whose prefix and dual caches are approximations)")


def resolve_cache(cache: str, model) -> str:
    """The cache mode a decode of `model` runs with: `auto` is the exact cache of a block-diffusion
    model (`dual`; its prefix and dual modes are the same exact cache) and none for a bidirectional
    one, whose caches are approximations that can change answers (ask for them by name)."""
    if cache != "auto":
        return cache
    return "dual" if getattr(model, "block_diffusion", None) is not None and model.supports_cache else "none"


@dataclass
class DecodeConfig:
    """How long to generate, in which blocks, with which seed, and what to record.

    `gen_length` / `block_length` of None take the model's defaults (the built-in model decodes
    short answers; LLaDA's are 256 / 32).
    """

    gen_length: int | None = None
    block_length: int | None = None
    seed: int = 0
    early_stop: bool = True  # stop once an EOS is committed with only EOS predicted after it
    record_trace: bool = False
    cache: str = "auto"  # "auto": the exact cache of a block-diffusion model, none for a bidirectional one (`resolve_cache`)
    max_steps_per_block: int | None = None  # safety bound for remasking policies (default 4 x block)

    def resolved(self, defaults, whole_generation: bool = False) -> "DecodeConfig":
        """The settings with the model's defaults filled in, validated. `whole_generation`: the policy
        has no blocks (one_shot), so its block is the generation, whatever block length was given."""
        gen = self.gen_length if self.gen_length is not None else defaults.gen_length
        block = self.block_length if self.block_length is not None else min(defaults.block_length, gen)
        if whole_generation and isinstance(gen, int):
            block = gen
        out = DecodeConfig(**{**self.__dict__, "gen_length": gen, "block_length": block})
        out.validate()
        return out

    def validate(self) -> None:
        if not isinstance(self.gen_length, int) or self.gen_length <= 0:
            raise UnmaskError(f"gen_length must be a positive integer, got {self.gen_length!r}", field="gen_length")
        if not isinstance(self.block_length, int) or self.block_length <= 0:
            raise UnmaskError(f"block_length must be a positive integer, got {self.block_length!r}", field="block_length")
        if self.gen_length % self.block_length:
            raise UnmaskError(
                f"block_length {self.block_length} does not divide gen_length {self.gen_length}; "
                "pick a block length that is a divisor of the generation length",
                field="block_length",
            )
        if self.cache not in CACHE_CHOICES:
            raise UnmaskError(f"cache must be one of {', '.join(CACHE_CHOICES)}, got {self.cache!r}", field="cache")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length  # type: ignore[operator]

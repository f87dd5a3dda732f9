"""Built-in policies; importing this package registers each of them."""

from unmask.decoding.policies import (  # noqa: F401
    ce,
    entropy,
    factor,
    learned_drafts,
    low_confidence,
    margin,
    one_shot,
    oracle,
    psd,
    r2,
    random_order,
    threshold,
    tspd,
)

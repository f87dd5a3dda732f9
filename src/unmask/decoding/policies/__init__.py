"""Built-in policies; importing this package registers each of them."""

from unmask.decoding.policies import (  # noqa: F401
    ce,
    entropy,
    factor,
    fastdllm_v2,
    learned_drafts,
    llada2,
    llada21,
    low_confidence,
    margin,
    one_shot,
    oracle,
    psd,
    r2,
    random_order,
    sdar,
    threshold,
    tspd,
)

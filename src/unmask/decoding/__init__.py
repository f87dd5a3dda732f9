"""The decode loop, its configuration, the trace and the policy registry."""

from unmask.decoding.config import DecodeConfig
from unmask.decoding.loop import DecodeResult, SequenceResult, generate
from unmask.decoding.policies.base import Decision, Policy, PolicyConfig, StepView
from unmask.decoding.registry import describe_policies, parse_strategy, policy_names, register_policy
from unmask.decoding.trace import Trace

__all__ = [
    "DecodeConfig", "DecodeResult", "Decision", "Policy", "PolicyConfig", "SequenceResult", "StepView", "Trace",
    "describe_policies", "generate", "parse_strategy", "policy_names", "register_policy",
]

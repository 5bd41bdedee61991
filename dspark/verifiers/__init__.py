"""Verifiers: greedy and chain rejection sampling (the rule's kernels are in :mod:`dspark.kernels`)."""

from dspark.verifiers.base import VERIFIERS, Verifier, VerifierConfig, register_verifier
from dspark.verifiers.chain import ChainVerifier, acceptance_probability, residual_distribution
from dspark.verifiers.greedy import GreedyVerifier, greedy_verify, leading_true

__all__ = ["VERIFIERS", "ChainVerifier", "GreedyVerifier", "Verifier", "VerifierConfig", "acceptance_probability",
           "greedy_verify", "leading_true", "register_verifier", "residual_distribution"]

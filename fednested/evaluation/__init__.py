"""Evaluation: held-out loss and perplexity per domain."""

from fednested.evaluation.domains import (
    DomainEval,
    EvalConfig,
    evaluate_domains,
    evaluate_records,
    perplexity_of,
)

__all__ = ["DomainEval", "EvalConfig", "evaluate_domains", "evaluate_records", "perplexity_of"]

"""The inference gap Delta_inf = ln p(x) - L_k(x) per example (Table 1): how much of ln p(x) the
amortized encoder's bound leaves out, ln p(x) coming from IW-SVI (or AIS)."""

from __future__ import annotations

from .common import Estimate


def inference_gap(log_likelihood: Estimate, bound: Estimate) -> Estimate:
    """Per-example Delta_inf = ln p(x) - L_k(x) (Table 1): how much the amortized encoder's bound
    leaves out.

    Args:
        log_likelihood: ln p(x) per example, from IW-SVI (or AIS).
        bound: the amortized bound L_k(x) on the same examples
            ([`amortized_bound`][airvae.estimators.amortized_bound]).

    Returns:
        The per-example [`Estimate`][airvae.estimators.Estimate], named ``gap``.

    Raises:
        ValueError: the two estimates are not on the same number of examples.
    """
    if log_likelihood.values.shape != bound.values.shape:
        raise ValueError(f"inference_gap: {log_likelihood.name} has {log_likelihood.values.numel()} examples, "
                         f"{bound.name} has {bound.values.numel()}; they must be the same examples")
    settings = {"log_likelihood": log_likelihood.name, "bound": bound.name}
    return Estimate("gap", log_likelihood.values - bound.values, settings,
                    log_likelihood.seconds + bound.seconds, log_likelihood.dims, difference=True)

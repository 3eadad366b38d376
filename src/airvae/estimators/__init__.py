"""Log-likelihood estimators for trained models, separate from training, by family:

* ``airvae.estimators.amortized`` -- [`iwae_log_likelihood`][airvae.estimators.iwae_log_likelihood], IWAE-k
  with the amortized encoder (appendix C, eq. 40), and [`amortized_bound`][airvae.estimators.amortized_bound],
  the model's own training bound L_k(x) (eq. 5 for k = 1, eq. 20);
* ``airvae.estimators.iwsvi`` -- [`iw_svi_log_likelihood`][airvae.estimators.iw_svi_log_likelihood],
  importance-weighted SVI (appendix C, eq. 41-42): a per-example Gaussian q optimized on the IWAE-l bound,
  then scored with IWAE-k;
* ``airvae.estimators.gap`` -- [`inference_gap`][airvae.estimators.inference_gap], Delta_inf = ln p(x) - L_k(x) per
  example (Table 1);
* ``airvae.estimators.ais`` -- [`ais_log_likelihood`][airvae.estimators.ais_log_likelihood], annealed
  importance sampling with HMC (not in the paper; an independent check of IW-SVI), and
  [`bdmc`][airvae.estimators.bdmc], bidirectional Monte Carlo (Grosse et al. 2015) on data
  [`simulate`][airvae.estimators.simulate]-d from the model: a stochastic lower *and upper* bound on ln p(x),
  certifying how tight AIS is;
* ``airvae.estimators.common`` -- the [`Estimate`][airvae.estimators.Estimate] they return and the per-example random
  streams they draw from;
* [`airvae.estimators.registry`][] -- [`REGISTRY`][airvae.estimators.registry.REGISTRY], the
  estimators an evaluation chooses from, each with its cost, memory, single-model and stacked call.

Every estimator takes any model that follows [`airvae.model.LatentVariableModel`][]
(``encode``, ``decoder``, ``likelihood``) and any data shape the likelihood scores. All of them
use the model's one log-weights path ([`airvae.model.log_weights_given_q`][]) or, for AIS and
BDMC, its log p(x|z) ([`airvae.model.conditional_log_prob`][]). Every example owns its random
streams, so an estimate does not depend on how the work is chunked.
"""

from ..devices import resolve_device
from .ais import DEFAULT_AIS_CHUNK_EXAMPLES, ais_log_likelihood, annealing_schedule, bdmc, simulate
from .amortized import amortized_bound, chunked_iwae, iwae_given_q, iwae_log_likelihood, log_weights_from_noise
from .common import (
                     DEFAULT_CHUNK_SAMPLES,
                     STREAM_AIS,
                     STREAM_BDMC_REVERSE,
                     STREAM_SCORE,
                     STREAM_SIMULATE,
                     STREAM_SVI,
                     Estimate,
                     StepNoise,
                     data_dims,
                     example_generator,
                     frozen,
                     latent_dim,
)
from .gap import inference_gap
from .iwsvi import (
                     DEFAULT_SVI_CHUNK_EXAMPLES,
                     DEFAULT_SVI_LR,
                     DEFAULT_SVI_LR_DECAY,
                     fit_gaussian_q,
                     fit_iw_svi,
                     iw_svi_log_likelihood,
)
from .registry import REGISTRY, Estimator

__all__ = [
    "DEFAULT_AIS_CHUNK_EXAMPLES", "DEFAULT_CHUNK_SAMPLES", "DEFAULT_SVI_CHUNK_EXAMPLES", "DEFAULT_SVI_LR",
    "DEFAULT_SVI_LR_DECAY", "REGISTRY", "STREAM_AIS", "STREAM_BDMC_REVERSE", "STREAM_SCORE", "STREAM_SIMULATE",
    "STREAM_SVI", "Estimate", "Estimator", "StepNoise", "ais_log_likelihood", "amortized_bound", "annealing_schedule",
    "bdmc", "chunked_iwae", "data_dims", "example_generator", "fit_gaussian_q", "fit_iw_svi", "frozen",
    "inference_gap", "iw_svi_log_likelihood", "iwae_given_q", "iwae_log_likelihood", "latent_dim",
    "log_weights_from_noise", "resolve_device", "simulate",
]

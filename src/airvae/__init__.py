"""airvae: amortized inference regularization (Shu et al., NeurIPS 2018) for VAEs and IWAEs.

Library use inside your own PyTorch VAE::

    from airvae import DenoisingEncoder, cap_weight_norms, iwae_bound, log_weights_given_q
"""

from .bounds import bernoulli_log_prob, elbo, gaussian_log_prob, iwae_bound, standard_normal_log_prob
from .config import ARCHITECTURES, BUDGETS, Architecture, ConfigError, Regularizer, RunConfig, resolve_run_config
from .model import VAE, air_objective, build_vae, cap_weight_norms, log_weights_given_q
from .networks import BernoulliDecoder, CappedWeightNormLinear, DenoisingEncoder, GaussianEncoder, parse_hidden_spec

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "BUDGETS", "Architecture", "BernoulliDecoder", "CappedWeightNormLinear", "ConfigError",
    "DenoisingEncoder", "GaussianEncoder", "Regularizer", "RunConfig", "VAE", "air_objective",
    "bernoulli_log_prob", "build_vae", "cap_weight_norms", "elbo", "gaussian_log_prob", "iwae_bound",
    "log_weights_given_q", "parse_hidden_spec", "resolve_run_config", "standard_normal_log_prob",
]

"""airvae: amortized inference regularization (Shu et al., NeurIPS 2018) for VAEs and IWAEs.

Library use inside your own PyTorch VAE:

```python
from airvae import DenoisingEncoder, cap_weight_norms, iwae_bound, log_weights_given_q
```

A trained model, from a run directory or a bundle (``airvae bundle``), in one line:

```python
model = airvae.load("runs/caltech/VAE-seed0")
```

Likelihoods ([`Bernoulli`][airvae.likelihoods.Bernoulli], [`Gaussian`][airvae.likelihoods.Gaussian],
[`DiscretizedLogistic`][airvae.likelihoods.DiscretizedLogistic]) score x from the decoder's output; the
estimators of [`airvae.estimators`][] take any model following
[`LatentVariableModel`][airvae.model.LatentVariableModel].
"""

from ._torch_floor import check_torch

check_torch()  # before anything loads a checkpoint: older torch's weights_only loading can run code

from . import data, estimators  # airvae.data.X and airvae.estimators.X after a bare `import airvae`
from ._version import __version__
from .bounds import bernoulli_log_prob, elbo, gaussian_log_prob, iwae_bound, standard_normal_log_prob
from .bundle import load
from .config import ARCHITECTURES, BUDGETS, Architecture, ConfigError, Regularizer, RunConfig, resolve_run_config
from .data import Dataset, DatasetError, TorchSplit, load_dataset
from .estimators import (
                         Estimate,
                         ais_log_likelihood,
                         amortized_bound,
                         inference_gap,
                         iw_svi_log_likelihood,
                         iwae_log_likelihood,
)
from .evaluation import EvaluationSettings, evaluate_model, evaluate_run
from .fit import fit
from .likelihoods import (
                         Bernoulli,
                         DiscretizedLogistic,
                         Gaussian,
                         Likelihood,
                         bits_per_dim,
                         log_likelihood_from_bits_per_dim,
)
from .model import (
                         VAE,
                         LatentVariableModel,
                         air_objective,
                         build_vae,
                         cap_weight_norms,
                         conditional_log_prob,
                         log_weights_given_q,
)
from .networks import (
                         BernoulliDecoder,
                         CappedFilterNorm,
                         CappedWeightNormLinear,
                         DenoisingEncoder,
                         GaussianEncoder,
                         MLPDecoder,
                         parse_hidden_spec,
)

__all__ = [
    "ARCHITECTURES", "BUDGETS", "Architecture", "Bernoulli", "BernoulliDecoder", "CappedFilterNorm",
    "CappedWeightNormLinear", "ConfigError", "Dataset", "DatasetError", "DenoisingEncoder", "DiscretizedLogistic",
    "Estimate", "EvaluationSettings", "Gaussian", "GaussianEncoder", "LatentVariableModel", "Likelihood",
    "MLPDecoder", "Regularizer", "RunConfig", "TorchSplit", "VAE", "air_objective", "ais_log_likelihood",
    "amortized_bound", "bernoulli_log_prob", "bits_per_dim", "build_vae", "cap_weight_norms", "conditional_log_prob",
    "data", "elbo", "estimators", "evaluate_model", "evaluate_run", "fit", "gaussian_log_prob", "inference_gap",
    "iw_svi_log_likelihood", "iwae_bound", "iwae_log_likelihood", "load", "load_dataset",
    "log_likelihood_from_bits_per_dim", "log_weights_given_q", "parse_hidden_spec", "resolve_run_config",
    "standard_normal_log_prob", "__version__",
]

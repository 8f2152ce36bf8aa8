"""The paper's appendix analyses on digits, built on the library's public APIs.

``run`` computes any of ``ANALYSES`` and writes PNG, CSV and JSON files:

* ``singular_values`` (Fig. 6): the largest singular value of every conv operator of the
  vanilla, BatchNorm and i-ResNet classifiers, by FFT and by power iteration;
* ``reconstructions`` (Fig. 7): i-ResNet and baseline reconstructions with 100 fixed-point
  iterations per block;
* ``convergence`` (Fig. 8): reconstruction error and time against the number of
  fixed-point iterations;
* ``logdet_bias`` (Fig. 9): bias and standard deviation of the power-series log-det
  estimator of the density model, with Theorem 3's bound;
* ``runtime`` (Table 5): one forward+backward pass of Glow and three i-ResNets;
* ``samples``: samples of the density model.

Modules: ``models`` (roles, their configs, training or restoring them), ``compute`` (the
numbers), ``runtime`` (Table 5), ``plots`` (the figures), ``runner`` (settings, ``run``).
The binary is ``python -m experiments.analyses``.
"""

from experiments.analyses.compute import (ConvLayer, conv_layers, conv_norms,
                                          fixed_point_convergence, fold_kernel, forward,
                                          logdet_bias, reconstruct, sample_images,
                                          singular_values)
from experiments.analyses.models import (NEEDS, Trained, default_name, get_models,
                                         load_workdir, model_config, roles, train_quick)
from experiments.analyses.runner import ANALYSES, get_settings, run, write_csv, write_json
from experiments.analyses.runtime import (RUNTIME_MODELS, runtime_comparison, runtime_flows,
                                          runtime_markdown)

__all__ = ["ANALYSES", "ConvLayer", "NEEDS", "RUNTIME_MODELS", "Trained", "conv_layers",
           "conv_norms", "default_name", "fixed_point_convergence", "fold_kernel", "forward",
           "get_models", "get_settings", "load_workdir", "logdet_bias", "model_config",
           "reconstruct", "roles", "run", "runtime_comparison", "runtime_flows",
           "runtime_markdown", "sample_images", "singular_values", "train_quick",
           "write_csv", "write_json"]

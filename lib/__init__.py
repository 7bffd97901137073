"""Token salience workbook: scorers, harnesses, models, data, metrics, runner and report.

The package installs from two top-level folders: ``lib/`` is ``salience`` and ``kernels/`` is ``salience.kernels``.
"""

__version__ = "0.1.0"

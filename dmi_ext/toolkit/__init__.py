"""The noisy-label toolkit: data, noise settings, baselines and the paper's experiments.

Built on the public API of ``dmi_ext`` (``DMILoss``, ``joint_matrix``); its ``noise`` module
(transition matrices, label corruption) needs only numpy. The op never imports the toolkit, so
``import dmi_ext`` needs neither scikit-learn nor matplotlib. Entry points: ``python -m dmi_ext
train`` and ``python -m dmi_ext reproduce`` (see ``cli``).
"""

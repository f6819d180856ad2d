"""The noisy-label toolkit: data, noise settings, baselines and the paper's experiments.

Built on the public API of ``dmi_ext`` (``DMILoss``, ``joint_matrix``) and ``dmi_ext.noise``;
the op never imports it, so ``import dmi_ext`` needs neither scikit-learn nor matplotlib. Entry
points: ``python -m dmi_ext train`` and ``python -m dmi_ext reproduce`` (see ``cli``).
"""

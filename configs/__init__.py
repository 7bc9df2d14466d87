"""The YAML configurations of ``subspace-optim train``, installed as ``subspace_optim.configs``
(package data: ``model/*.yaml`` and ``train/*.yaml``), so that any install finds them."""

"""``python -m subspace_optim`` (and ``torchrun -m subspace_optim``): the command line."""

from .cli import app

app()

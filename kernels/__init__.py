"""Triton kernels, installed as ``subspace_optim.kernels``.

Each kernel sits beside a pure-PyTorch reference with the same signature; the references
live in the core package so that nothing here is imported unless Triton is.

This folder sits at the top of the repository, where Python also finds it as a top-level
package named ``kernels`` whenever it runs from the repository root (``python -m pytest``,
a script there). bitsandbytes and transformers import Hugging Face's ``kernels`` package
under that name; finding this folder instead, they fail (``cannot import name 'get_kernel'
from 'kernels'``). So when imported under that name, it steps aside: the import resolves to
the real ``kernels`` further down ``sys.path``, or to an empty module that reads as not
installed.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        # No real ``kernels`` installed. Raising here would escape transformers' probe,
        # which imports the name when it finds no metadata; an empty module without a file
        # is what it reads as "not installed" (a namespace folder), and ``from kernels
        # import get_kernel`` still fails with ImportError, as for a missing package.
        __file__ = None
        __path__ = []
        for _name in ("importlib", "os", "sys", "_root", "_path", "_spec"):
            del globals()[_name]
    else:
        del sys.modules["kernels"]
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)

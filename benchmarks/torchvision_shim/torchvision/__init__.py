"""A stand-in for the one part of torchvision that diffusers' example training scripts import.

torchvision cannot be installed beside this environment's locally built torch, yet diffusers'
``textual_inversion.py`` and ``train_dreambooth_lora.py`` do ``from torchvision import transforms``.
``benchmarks/diffusers_scripts.py`` puts ``../startup`` on PYTHONPATH for the subprocess that runs such a
script (never for conceptor itself): its sitecustomize serves this package to the script's own
``import torchvision`` and hides it from the ``importlib.util.find_spec("torchvision")`` probes of
transformers, accelerate and diffusers, which, told yes, would import torchvision.io, transforms.v2 and
more that this stand-in does not have. Only ``torchvision.transforms`` is provided, with torchvision's
semantics for PIL images; see transforms.py.

Once imported, the package hides itself again: at the first import after this one (the script's next
``import``), a one-shot finder drops ``torchvision*`` from sys.modules (where find_spec would otherwise
find it). The script keeps the ``transforms`` module it bound; every later probe sees no torchvision.
"""
import sys

from . import transforms

__version__ = "0.0.0+conceptor-benchmark-shim"
__all__ = ["transforms"]


class _Vanish:
    """A meta-path finder that, the first time it is asked about any module, forgets torchvision; it finds
    nothing itself."""

    def find_spec(self, fullname, path=None, target=None):
        if self in sys.meta_path:
            sys.meta_path.remove(self)
            for name in [n for n in sys.modules if n == __name__ or n.startswith(__name__ + ".")]:
                del sys.modules[name]
        return None


sys.meta_path.insert(0, _Vanish())

"""Startup hook of the torchvision stand-in (../torchvision): on PYTHONPATH only for a diffusers example script
that benchmarks/diffusers_scripts.py runs.

It serves ``import torchvision`` to the script (the ``__main__`` module) and to nobody else: transformers
and accelerate ask ``importlib.util.find_spec("torchvision")`` at import time whether torchvision is
installed, and when told yes they import torchvision.io, transforms.v2 and more that the stand-in lacks.
So the stand-in folder is not on sys.path; this finder hands its spec only to an import statement run
by the script itself, once, and probes keep seeing no torchvision (the truth in this environment).
"""
import importlib.machinery
import os
import sys

_SHIM = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MACHINERY = ("importlib", "_frozen_importlib")


class _ServeToScript:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        probe = getattr(sys.modules.get("importlib.util"), "find_spec", None)
        frame = sys._getframe(1)
        # walk out of the import system's own frames; a find_spec probe is never served, whoever asks
        while frame is not None and frame.f_globals.get("__name__", "").startswith(_MACHINERY):
            if probe is not None and frame.f_code is probe.__code__:
                return None
            frame = frame.f_back
        if frame is None or frame.f_globals.get("__name__") != "__main__":
            return None
        sys.meta_path.remove(self)  # served once: torchvision/__init__ then hides the package again
        return importlib.machinery.PathFinder.find_spec(fullname, [_SHIM])


sys.meta_path.insert(0, _ServeToScript())

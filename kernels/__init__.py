"""Installed as `edgevl.kernels`. From a checkout's root on sys.path (`python -m pytest`, `python -m benchmarks`) this
directory is also the top-level package `kernels`, the name of the Hugging Face package that transformers imports
(a dependency of transformers 5.25 and later). Imported under that name, it hands over to that package where one is
installed, so transformers works from the checkout too."""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or ".").resolve() != _root])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # what the import statement returns once this file has run
        _spec.loader.exec_module(_module)

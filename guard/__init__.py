"""safety-guard core: what training and serving share.

Nothing in this package imports vLLM, `training` or `serve`; it must stay importable on a machine that only
vets adapters or only serves them.
"""

from guard.errors import GuardError

__version__ = "0.1.0"
__all__ = ["GuardError", "__version__"]

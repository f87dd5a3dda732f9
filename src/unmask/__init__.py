"""unmask: fast decoding for masked diffusion language models.

One decode loop (`unmask.decoding.generate`), many policies (`unmask.decoding.registry`),
native LLaDA and Dream models (`unmask.models.load_model`) and an honest benchmark harness.
"""

from unmask.errors import UnmaskError

__version__ = "0.1.0"
__all__ = ["UnmaskError", "__version__"]

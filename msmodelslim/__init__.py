"""msmodelslim: post-training quantization of LLMs into checkpoints that serving engines load.

`msmodelslim.quantize(...)` and `msmodelslim.evaluate(...)` are the Python API (msmodelslim/api.py); they are
imported on first use, so `import msmodelslim` (and the command line's argument errors) stay fast.
"""

__version__ = "0.1.0"
__all__ = ["quantize", "evaluate"]


def __getattr__(name: str):
    if name in __all__:
        from msmodelslim import api

        return getattr(api, name)
    raise AttributeError(f"module 'msmodelslim' has no attribute {name!r}")

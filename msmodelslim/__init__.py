"""msmodelslim: post-training quantization of LLMs into checkpoints that serving engines load."""

__version__ = "0.1.0"

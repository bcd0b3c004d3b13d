"""Adapters of the Llama and Qwen families: each is its structure, described once as data."""
from msmodelslim.model.interface import LLAMA_ROTATION, LLAMA_SMOOTH_SUBGRAPHS, ModelStructure
from msmodelslim.model.transformers_model import TransformersModel


class LlamaAdapter(TransformersModel):
    structure = ModelStructure(hf_model_types=("llama",), smooth_subgraphs=LLAMA_SMOOTH_SUBGRAPHS,
                               rotation=LLAMA_ROTATION)


class Qwen2Adapter(TransformersModel):
    structure = ModelStructure(hf_model_types=("qwen2",), smooth_subgraphs=LLAMA_SMOOTH_SUBGRAPHS,
                               rotation=LLAMA_ROTATION)


class Qwen3Adapter(TransformersModel):
    structure = ModelStructure(hf_model_types=("qwen3",), smooth_subgraphs=LLAMA_SMOOTH_SUBGRAPHS,
                               rotation=LLAMA_ROTATION)

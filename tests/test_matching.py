import pytest

from msmodelslim.processor.linear_quant.config import LinearQuantConfig
from msmodelslim.processor.linear_quant.processor import LinearQuantProcessor
from msmodelslim.processor.matching import expand_braces, select, unused_patterns
from msmodelslim.processor.registry import DoubleMatchError, merge_claims

NAMES = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]


def test_braces_wildcards_and_exclude_wins():
    assert expand_braces("*.{q,o}_proj") == ["*.q_proj", "*.o_proj"]
    chosen = select(NAMES, ["*.layers.{0,2}.*"], ["*down_proj"])
    assert chosen == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
                      "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.o_proj"]
    assert unused_patterns(NAMES, ["*q_proj", "*gate_proj"]) == ["*gate_proj"]


def processor(include, exclude=()):
    return LinearQuantProcessor(LinearQuantConfig(type="linear_quant", include=list(include), exclude=list(exclude),
                                                  qconfig={"weight": {"dtype": "int8", "scope": "per_channel"}}))


def test_a_layer_matched_twice_names_both_rules():
    first, second = processor(["*"], ["*down_proj"]), processor(["*layers.1.*"])
    with pytest.raises(DoubleMatchError) as info:
        merge_claims([("spec.process[0]", first.claims(NAMES)), ("spec.process[1]", second.claims(NAMES))])
    message = str(info.value)
    assert "model.layers.1.self_attn.q_proj" in message
    assert "spec.process[0]" in message and "spec.process[1]" in message
    merge_claims([("a", first.claims(NAMES)), ("b", processor(["*down_proj"]).claims(NAMES))])  # disjoint: fine

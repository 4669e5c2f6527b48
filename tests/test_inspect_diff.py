"""Where a diff's nonzeros sit: every body parameter of the supported encoders gets a layer and a
component (the paper's analysis, Sec. 6), so nothing lands in "other"."""
import pytest
from transformers import (BertConfig, BertForSequenceClassification, MPNetConfig,
                          MPNetForSequenceClassification, RobertaConfig,
                          RobertaForSequenceClassification)

from diffprune.inspect_diff import component, layer

TINY = dict(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=80, num_labels=2)
MODELS = {"bert": (BertConfig, BertForSequenceClassification),
          "roberta": (RobertaConfig, RobertaForSequenceClassification),
          "mpnet": (MPNetConfig, MPNetForSequenceClassification)}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_body_parameter_has_a_layer_and_a_component(kind):
    config, cls = MODELS[kind]
    names = [n for n, _ in cls(config(**TINY)).named_parameters()
             if not n.startswith("classifier.")]  # the head is trained densely, not diffed
    assert [n for n in names if component(n) == "other"] == []
    assert [n for n in names if layer(n) == "other"] == []
    found = {component(n) for n in names if n.endswith(".weight")}
    assert {"embeddings", "attn_q", "attn_k", "attn_v", "attn_o", "ffn", "layer_norm"} <= found
    assert {component(n) for n in names if n.endswith(".bias")} <= {"bias", "layer_norm"}
    assert {layer(n) for n in names} >= {"embeddings", "0", "1"}


def test_named_examples():
    assert component("mpnet.encoder.layer.3.attention.attn.o.weight") == "attn_o"
    assert component("bert.encoder.layer.3.attention.output.dense.weight") == "attn_o"
    assert component("bert.encoder.layer.3.output.dense.weight") == "ffn"
    assert component("mpnet.encoder.relative_attention_bias.weight") == "embeddings"
    assert layer("bert.embeddings.LayerNorm.weight") == "embeddings"
    assert layer("mpnet.encoder.layer.11.intermediate.dense.weight") == "11"

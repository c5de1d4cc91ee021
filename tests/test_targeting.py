"""target_modules matching follows PEFT's rules."""

from __future__ import annotations

import pytest
from torch import nn

import adapterkit as ak
from adapterkit.core.targeting import select_modules


def _targets(model, **kwargs):
    return select_modules(model, ak.LoRAConfig(**kwargs))[0]


def test_list_matches_exact_names_and_dot_suffixes(tiny_bert):
    names = _targets(tiny_bert, target_modules=["query", "bert.encoder.layer.1.attention.self.value"])
    assert names == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]


def test_suffix_must_start_at_a_dot(tiny_bert):
    with pytest.raises(ak.TargetError):
        _targets(tiny_bert, target_modules=["uery"])


def test_string_is_a_full_regex_match(tiny_bert):
    assert _targets(tiny_bert, target_modules=r".*layer\.0\..*(query|key)") == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.key",
    ]
    with pytest.raises(ak.TargetError):
        _targets(tiny_bert, target_modules="query")  # a regex must match the whole name


def test_all_linear_skips_the_output_head(tiny_llama):
    names = _targets(tiny_llama, target_modules="all-linear")
    assert "lm_head" not in names and len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer


def test_all_linear_skips_the_head_of_a_sequence_classifier(tiny_bert):
    bert = _targets(tiny_bert, target_modules="all-linear")
    assert "classifier" not in bert  # as PEFT for SEQ_CLS: the fresh head is not a low-rank target
    linear = [n for n, m in tiny_bert.named_modules() if isinstance(m, nn.Linear)]
    assert bert == [n for n in linear if n != "classifier"] and "bert.pooler.dense" in bert
    # naming the head still targets it, and modules_to_save copies it
    assert _targets(tiny_bert, target_modules=["classifier"]) == ["classifier"]
    assert select_modules(tiny_bert, ak.LoRAConfig(target_modules="all-linear", modules_to_save=["classifier"]))[1] \
        == ["classifier"]


def test_all_linear_skips_token_classification_and_score_heads_and_whole_head_blocks():
    from transformers import BertForTokenClassification, LlamaConfig, LlamaForSequenceClassification
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from conftest import tiny_bert_config

    token = BertForTokenClassification(tiny_bert_config())
    assert "classifier" not in _targets(token, target_modules="all-linear")
    llama = LlamaForSequenceClassification(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=4,
                                                       num_key_value_heads=2, num_labels=3))
    names = _targets(llama, target_modules="all-linear")
    assert "score" not in names and len(names) == 7
    roberta = RobertaForSequenceClassification(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=64,
                                                             max_position_embeddings=64, num_labels=3))
    names = _targets(roberta, target_modules="all-linear")  # head = classifier.dense + classifier.out_proj
    assert not [n for n in names if n.startswith("classifier")] and "roberta.encoder.layer.0.output.dense" in names


def test_classifier_named_modules_are_targets_outside_classification_models(mlp):
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("classifier", nn.Linear(4, 2))
    assert _targets(model, target_modules="all-linear") == ["body", "classifier"]


def test_exclude_modules_wins(tiny_llama):
    names = _targets(tiny_llama, target_modules="all-linear", exclude_modules=["down_proj", "k_proj"])
    assert not any(n.endswith(("down_proj", "k_proj")) for n in names) and len(names) == 2 * 5


def test_layers_to_transform_filters_by_layer_index(tiny_llama):
    names = _targets(tiny_llama, target_modules=["q_proj"], layers_to_transform=[1])
    assert names == ["model.layers.1.self_attn.q_proj"]
    names = _targets(tiny_llama, target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers")
    assert names == ["model.layers.0.self_attn.q_proj"]


def test_modules_to_save_are_never_targets(tiny_bert):
    targets, copies = select_modules(tiny_bert, ak.LoRAConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    assert "classifier" not in targets and copies == ["classifier"]


def test_plain_module_names_and_already_wrapped_models(mlp):
    ak.attach(mlp, ak.LoRAConfig(target_modules=["0"]), "a")
    # the wrapped module still matches under its original name
    assert _targets(mlp, target_modules=["0", "2"]) == ["0", "2"]
    ak.attach(mlp, ak.LoRAConfig(target_modules=["0", "2"]), "b")
    assert list(mlp[0].adapters) == ["a", "b"] and mlp[0].adapters["b"].adapter_name == "b"


def test_matching_an_unsupported_module_type_raises(tiny_bert):
    with pytest.raises(ak.TargetError, match="LayerNorm"):
        ak.attach(tiny_bert, ak.LoRAConfig(target_modules=["LayerNorm"]))


def test_no_match_error_shows_module_names(mlp):
    with pytest.raises(ak.TargetError, match="matched no module"):
        ak.attach(mlp, ak.LoRAConfig(target_modules=["q_proj"]))

"""The real all-MiniLM-L6-v2 with real VADER data: training, exact fusing, PEFT files both ways."""

from __future__ import annotations

import copy

import pytest
import torch

import adapterkit as ak
from adapterkit.zoo import data
from adapterkit.zoo.models import load_sentence_classifier, minilm_path

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_sentence_classifier()
    return model, tokenizer


@pytest.fixture
def sentences(minilm):
    _, tokenizer = minilm
    return tokenizer(["A gorgeous, witty film.", "Dull and far too long.", "It is a movie."], padding=True, return_tensors="pt")


def test_short_lora_training_learns_sentiment(minilm):
    model, tokenizer = copy.deepcopy(minilm[0]), minilm[1]
    torch.manual_seed(0)
    train_set = data.vader("movies", "train").head(480)
    test_set = data.vader("movies", "test").head(300)
    ak.attach(model, ak.LoRAConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    test_batches = list(ak.TextBatches(tokenizer, test_set, 100, by_length=True))
    before = ak.accuracy(model, test_batches)
    losses = ak.train(model, ak.TextBatches(tokenizer, train_set, 32, shuffle=True), epochs=1, lr=3e-3, progress=False)
    after = ak.accuracy(model, test_batches)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert after > 0.65 and after > before + 0.1, (before, after)


def test_fuse_switch_unfuse_is_bit_exact_on_all_linear_layers(minilm, sentences):
    model = copy.deepcopy(minilm[0])
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = ak.LoRAConfig(r=8, target_modules="all-linear", init="random")
    ak.attach(model, config, "a")
    ak.attach(model, config, "b")
    unfused = model(**sentences)["logits"]
    ak.fuse(model)
    torch.testing.assert_close(model(**sentences)["logits"], unfused, rtol=1e-4, atol=1e-4)
    for _ in range(100):
        ak.switch(model, "b")
        ak.switch(model, "a")
    ak.unfuse(model)
    for name, param in model.named_parameters():
        key = name.replace(".base_layer", "")
        if key in originals:
            assert torch.equal(param, originals[key]), name


def test_peft_files_round_trip_on_minilm(minilm, tmp_path, sentences):
    import peft
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(minilm_path()), add_pooling_layer=False).eval()
    inputs = {k: v for k, v in sentences.items() if k != "token_type_ids"}
    peft_model = peft.get_peft_model(copy.deepcopy(encoder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)).eval()
    expected = peft_model(**inputs).last_hidden_state
    peft_model.save_pretrained(tmp_path / "from-peft")
    mine = copy.deepcopy(encoder)
    ak.load(mine, tmp_path / "from-peft")
    torch.testing.assert_close(mine(**inputs).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    ak.save(mine, tmp_path / "to-peft", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(encoder), tmp_path / "to-peft").eval()
    torch.testing.assert_close(again(**inputs).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


def test_saved_adapter_refuses_a_different_base(minilm, tmp_path):
    model = copy.deepcopy(minilm[0])
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["query"]), "a")
    ak.save(model, tmp_path / "a", "a")
    other = copy.deepcopy(minilm[0])
    with torch.no_grad():
        other.encoder.encoder.layer[3].attention.self.query.weight.mul_(1.01)
    with pytest.raises(ak.FingerprintMismatchError, match="ignore_fingerprint"):
        ak.load(other, tmp_path / "a")
    assert ak.load(other, tmp_path / "a", ignore_fingerprint=True) == "a"


def test_sampled_check_is_default_and_full_check_sees_a_single_edited_entry(minilm, tmp_path):
    from adapterkit.io.fingerprint import sample_positions

    model = copy.deepcopy(minilm[0])
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["query"]), "a")
    ak.save(model, tmp_path / "a", "a")
    edited = copy.deepcopy(minilm[0])
    weight = edited.encoder.encoder.layer[0].attention.self.query.weight
    unsampled = next(i for i in range(weight.numel()) if i not in set(sample_positions(weight.numel()).tolist()))
    with torch.no_grad():
        weight.view(-1)[unsampled] += 0.5
    assert ak.load(copy.deepcopy(edited), tmp_path / "a") == "a"  # documented: the sample misses it
    with pytest.raises(ak.FingerprintMismatchError):
        ak.load(edited, tmp_path / "a", verify="full")
    with pytest.raises(ak.ConfigError):
        ak.load(edited, tmp_path / "a", verify="quick")

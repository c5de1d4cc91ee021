"""The cross-lingual reranking application (apps/clir) on tiny random decoders and a word tokenizer."""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.apps.clir import language, pipeline, ranking, reranker, systems
from adapterkit.apps.clir.evaluate import ranked_ids
from adapterkit.apps.clir.modules import ADAPTER_TARGETS, Backbone, ModuleRecord, adapter_size
from adapterkit.errors import ConfigError

VOCAB = 120


class WordTokenizer:
    """Whitespace words → stable ids in [4, VOCAB); 0 pad, 1 eos, 2 bos (Gemma's ids)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[4 + zlib.crc32(w.encode()) % (VOCAB - 4) for w in t.split()] for t in texts]}


def tiny_gemma():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(params=["gemma", "llama"])
def backbone(request):
    lm = tiny_gemma() if request.param == "gemma" else tiny_llama()
    for p in lm.parameters():
        p.requires_grad_(False)
    return Backbone(request.param, lm, WordTokenizer())


@pytest.fixture
def gemma():
    return Backbone("gemma", tiny_gemma(), WordTokenizer())


def words(seed, n):
    g = torch.Generator().manual_seed(seed)
    vocab = [f"w{i}" for i in range(60)]
    return " ".join(vocab[int(i)] for i in torch.randint(0, 60, (n,), generator=g))


# -- cross-encoder ---------------------------------------------------------------------------------

def test_last_token_pooling_with_padding_equals_unpadded_single_calls(backbone):
    model = reranker.cross_encoder(backbone.fresh())
    with torch.no_grad():  # a random head would score near zero: make the comparison sensitive
        model.head.weight.normal_()
    encoder = reranker.PairEncoder(backbone.tokenizer)
    queries, docs = [words(1, 3), words(2, 6), words(3, 2)], [words(4, 20), words(5, 4), words(6, 11)]
    batch = encoder.encode(queries, docs)
    assert (batch.attention_mask == 0).any()  # the rows really are padded
    with torch.no_grad():
        together = model(**batch.inputs())["logits"]
        alone = torch.stack([model(**encoder.encode([q], [d]).inputs())["logits"][0] for q, d in zip(queries, docs)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert together.std() > 1e-3  # the three pairs score differently


def test_document_mask_marks_exactly_the_document_tokens():
    tok = WordTokenizer()
    encoder = reranker.PairEncoder(tok, reranker.PairFormat(separator="SEP here", max_query_tokens=3, max_doc_tokens=4))
    batch = encoder.encode(["a b c d e", "x"], ["d1 d2", "e1 e2 e3 e4 e5 e6"])
    ids = lambda text: tok([text])["input_ids"][0]  # noqa: E731
    sep = ids("SEP here")
    expected_rows = [[2, *ids("a b c"), *sep, *ids("d1 d2"), 1], [2, *ids("x"), *sep, *ids("e1 e2 e3 e4"), 1]]
    expected_docs = [ids("d1 d2"), ids("e1 e2 e3 e4")]
    for row, want, doc, mask, marks in zip(batch.input_ids, expected_rows, expected_docs, batch.attention_mask,
                                           batch.doc_mask):
        n = len(want)
        assert row[:n].tolist() == want and row[n:].eq(0).all()
        assert mask.tolist() == [1] * n + [0] * (len(row) - n)
        assert row[marks].tolist() == doc  # the document's tokens, nothing else
        start = n - 1 - len(doc)
        assert marks.nonzero().flatten().tolist() == list(range(start, start + len(doc)))


def test_pair_encoder_refuses_mismatched_lists():
    with pytest.raises(ConfigError):
        reranker.PairEncoder(WordTokenizer()).encode(["q"], [])


# -- shortlist LM -----------------------------------------------------------------------------------

def test_shortlist_loss_equals_full_softmax_ce_restricted_to_the_shortlist(backbone):
    lm = backbone.fresh()
    shortlist = reranker.Shortlist((1, 5, 9, 17, 33, 40, 77, 101))
    model = reranker.language_model(lm, shortlist)
    ids = torch.tensor([[2, 5, 9, 18, 33, 40, 1], [2, 77, 101, 5, 5, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    loss = model(input_ids=ids, attention_mask=mask, labels=ids)["loss"]
    # by hand: the LM's own full logits, columns of the shortlist, targets = next tokens in the shortlist
    with torch.no_grad():
        full = lm(input_ids=ids, attention_mask=mask).logits
    cols = torch.tensor(shortlist.ids)
    terms = []
    for b in range(2):
        for t in range(6):
            target = int(ids[b, t + 1])
            if mask[b, t + 1] and target in shortlist.ids:
                restricted = full[b, t, cols]
                terms.append(-F.log_softmax(restricted, -1)[shortlist.ids.index(target)])
    assert len(terms) == 9  # 18 (not listed) and the padding are ignored
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


def test_shortlist_keeps_the_most_frequent_ids_and_eos():
    tok = WordTokenizer()
    shortlist = reranker.Shortlist.from_texts(tok, ["a a a b b c", "a b d"], size=3)
    a, b = tok(["a b"])["input_ids"][0]
    assert shortlist.ids == tuple(sorted({a, b, 1}))


def test_packed_batches_fill_rows_without_padding():
    batches = language.PackedBatches(WordTokenizer(), [words(i, 9) for i in range(10)], batch_size=3,
                                     max_tokens=8, steps=4)
    seen = list(batches)
    assert len(seen) == 4 and all(b["input_ids"].shape == (3, 8) for b in seen)
    assert all(bool((b["input_ids"][:, 0] == 2).all()) and bool(b["attention_mask"].all()) for b in seen)
    assert [b["input_ids"].tolist() for b in batches] == [b["input_ids"].tolist() for b in seen]  # re-iterable


# -- module paths ---------------------------------------------------------------------------------

def test_language_adapter_saved_from_the_lm_loads_into_the_cross_encoder(backbone, tmp_path):
    lm_model = reranker.language_model(backbone.fresh(), reranker.Shortlist((1, 5, 9)))
    ce_model = reranker.cross_encoder(backbone.fresh())
    lm_paths = {n for n, _ in lm_model.named_modules() if n.startswith("body.")}
    assert lm_paths == {n for n, _ in ce_model.named_modules() if n.startswith("body.")}
    ak.attach(lm_model, ak.BottleneckConfig(target_modules=ADAPTER_TARGETS, reduction_factor=4, init="random"), "lang_de")
    ak.save(lm_model, tmp_path / "de", "lang_de")
    ids = torch.tensor([[2, 7, 8, 9, 1]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = ce_model.body(input_ids=ids, attention_mask=mask).last_hidden_state
        assert ak.load(ce_model, tmp_path / "de") == "lang_de"
        adapted = ce_model.body(input_ids=ids, attention_mask=mask).last_hidden_state
        trained = lm_model.body(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(adapted, trained)
    assert not torch.allclose(adapted, plain)


def test_adapter_size_formula_matches_an_attached_adapter(gemma):
    model = reranker.cross_encoder(gemma.fresh())
    ak.attach(model, ak.BottleneckConfig(target_modules=ADAPTER_TARGETS, reduction_factor=2), "a")
    attached = sum(p.numel() for p in ak.adapter_parameters(model, "a"))
    assert attached == adapter_size(gemma.hidden, gemma.layers, 2) == 2 * (2 * 32 * 16 + 16 + 32)


# -- systems ----------------------------------------------------------------------------------------

def test_system_plans_name_the_right_compositions():
    plan = systems.system("sft+both").plan("en", "de")
    assert plan.languages == ("en", "de") and plan.block == ak.Add("rank", "lang_en", "lang_de")
    plan = systems.system("adapter+split").plan("en", "de")
    assert plan.routed and plan.block == ak.Stack(ak.Split("lang_en", "lang_de", by="mask"), "rank")
    assert systems.system("adapter+dlang").plan("en", "ru").block == ak.Stack("lang_ru", "rank")
    assert systems.system("sft+qlang").plan("en", "fr").block == ak.Add("rank", "lang_en")
    mono = {systems.system(n).plan("de", "de").key for n in ("adapter+dlang", "adapter+qlang", "adapter+split")}
    assert mono == {"adapter:de"}
    assert systems.system("sft+both").plan("de", "de").key == systems.system("sft+dlang").plan("de", "de").key
    with pytest.raises(ConfigError):
        systems.System("bad", "sft", "split")
    with pytest.raises(ConfigError):
        systems.system("nope")


# -- training and scoring end to end ----------------------------------------------------------------

@dataclasses.dataclass
class FakeCollection:
    pair: str
    query_lang: str
    doc_lang: str
    queries: dict
    docs: dict
    qrels: dict


def fake_collection(pair="en-de"):
    q, d = pair.split("-")
    docs = {f"d{i}": words(100 + i, 12) for i in range(12)}
    queries = {f"q{i}": words(200 + i, 4) for i in range(4)}
    return FakeCollection(pair, q, d, queries, docs, {f"q{i}": {f"d{i}": 1} for i in range(4)})


def fake_candidates(coll, depth=6):
    return {q: {f"d{(i + j) % 12}": float(depth - j) for j in range(depth)} for i, q in enumerate(sorted(coll.queries))}


def examples(n=6):
    return [ranking.RankingExample(words(300 + i, 4), words(400 + i, 10), tuple(words(500 + 7 * i + j, 10)
                                                                               for j in range(3))) for i in range(n)]


TINY_LANG = dict(steps=2, batch_size=2, max_tokens=8, reduction_factor=4, shortlist_size=50)
TINY_RANK = dict(steps=2, queries_per_batch=2, negatives=2, reduction_factor=4, lora_rank=2, max_doc_tokens=8)


@pytest.fixture(scope="module")
def trained_adapters(tmp_path_factory):
    gemma = Backbone("gemma", tiny_gemma(), WordTokenizer())
    tmp_path = tmp_path_factory.mktemp("modules")
    dirs = pipeline.ModuleDirs()
    for code in ("en", "de"):
        texts = [words(600 + i + (50 if code == "de" else 0), 12) for i in range(20)]
        record = language.train_language_module(gemma, code, texts, language.LanguageOptions(kind="adapter", **TINY_LANG),
                                                tmp_path / f"lang-{code}")
        assert record.steps == 4 and record.name == f"lang_{code}"  # adapters: the SFT's two phases together
        dirs.languages[code] = tmp_path / f"lang-{code}"
    record = ranking.train_ranking_module(gemma, examples(), ranking.RankingOptions(kind="adapter", **TINY_RANK),
                                          tmp_path / "rank", lang_module=dirs.languages["en"])
    assert record.trainable == adapter_size(32, 2, 4) + 33  # the ranking adapter and the head; lang_en frozen
    dirs.ranking = tmp_path / "rank"
    return dirs


def test_adapter_systems_activate_exactly_their_modules(gemma, trained_adapters):
    expected = {"adapter": ["rank"], "adapter+dlang": ["lang_de", "rank"], "adapter+qlang": ["lang_en", "rank"],
                "adapter+split": ["lang_en", "lang_de", "rank"]}
    for name, active in expected.items():
        plan = systems.system(name).plan("en", "de")
        model = pipeline.build_reranker(gemma, plan, trained_adapters)
        assert sorted(pipeline.active_names(model)) == sorted(active), name
        assert sorted(ak.adapters(model)) == sorted(["rank", *(systems.lang_name(c) for c in plan.languages)])


def test_split_routes_document_tokens_through_the_document_language(gemma, trained_adapters):
    coll = fake_collection()
    encoder = reranker.PairEncoder(gemma.tokenizer, reranker.PairFormat(max_doc_tokens=8))
    pairs = encoder.encode([coll.queries["q0"], coll.queries["q1"]], [coll.docs["d0"], coll.docs["d5"]])
    plan = systems.system("adapter+split").plan("en", "de")
    model = pipeline.build_reranker(gemma, plan, trained_adapters)
    with pytest.raises(ConfigError):  # a Split by "mask" needs the mask
        model(**pairs.inputs())
    with torch.no_grad():
        with ak.routing(model, pairs.doc_mask):
            routed = model(**pairs.inputs())["logits"]
        with ak.routing(model, torch.zeros_like(pairs.doc_mask)):
            all_q = model(**pairs.inputs())["logits"]
        with ak.routing(model, pairs.attention_mask.bool()):
            all_d = model(**pairs.inputs())["logits"]
        ak.activate(model, ak.Stack("lang_en", "rank"))
        qlang = model(**pairs.inputs())["logits"]
        ak.activate(model, ak.Stack("lang_de", "rank"))
        dlang = model(**pairs.inputs())["logits"]
    torch.testing.assert_close(all_q, qlang)
    torch.testing.assert_close(all_d, dlang)
    assert not torch.allclose(routed, qlang) and not torch.allclose(routed, dlang)


def test_rerank_scores_the_top_k_and_keeps_the_rest_below(gemma, trained_adapters):
    coll = fake_collection()
    candidates = fake_candidates(coll)
    options = pipeline.EvalOptions(queries=4, top_k=3, depth=6, batch_size=5, max_doc_tokens=8)
    for name in ("adapter+split", "adapter+dlang"):
        run = pipeline.score_system(gemma, systems.system(name), coll, candidates, trained_adapters, options,
                                    progress=False)
        for q, docs in candidates.items():
            order = ranked_ids(docs)
            new = ranked_ids(run[q])
            assert set(new[:3]) == set(order[:3]) and new[3:] == order[3:]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_lora_and_full_ranking_modules_train_save_and_reload(gemma, tmp_path, kind):
    options = ranking.RankingOptions(kind=kind, **TINY_RANK)
    record = ranking.train_ranking_module(gemma, examples(), options, tmp_path / kind)
    assert ModuleRecord.read(tmp_path / kind) == record
    model = pipeline.build_reranker(gemma, systems.system(kind).plan("en", "de"), pipeline.ModuleDirs(tmp_path / kind))
    pristine = reranker.cross_encoder(gemma.fresh())
    pairs = reranker.PairEncoder(gemma.tokenizer).encode([words(1, 3)], [words(2, 5)])
    with torch.no_grad():
        assert not torch.allclose(model(**pairs.inputs())["logits"], pristine(**pairs.inputs())["logits"])
    embeddings = model.body.get_input_embeddings().weight
    assert torch.equal(embeddings, pristine.body.get_input_embeddings().weight)  # full FT leaves them frozen
    if kind == "full":
        assert record.trainable == sum(p.numel() for p in pristine.parameters()) - embeddings.numel()


def test_ranking_module_refuses_the_wrong_language_module(gemma, tmp_path, trained_adapters):
    with pytest.raises(ConfigError):
        ranking.train_ranking_module(gemma, examples(), ranking.RankingOptions(kind="lora", **TINY_RANK),
                                     tmp_path / "x", lang_module=trained_adapters.languages["en"])
    with pytest.raises(ConfigError):
        ranking.train_ranking_module(gemma, examples(), ranking.RankingOptions(kind="adapter", **TINY_RANK),
                                     tmp_path / "x")
    with pytest.raises(ConfigError):
        pipeline.build_reranker(gemma, systems.system("adapter+dlang").plan("en", "fr"), trained_adapters)


def test_listwise_batches_put_the_positive_first():
    encoder = reranker.PairEncoder(WordTokenizer(), reranker.PairFormat(max_doc_tokens=8))
    batches = ranking.RankingBatches(encoder, examples(3), queries_per_batch=2, negatives=2, steps=3)
    batch = next(iter(batches))
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].tolist() == [1, 0, 0, 1, 0, 0]
    scores = torch.tensor([5.0, 0.0, 0.0, 0.0, 5.0, 0.0])

    class Fixed(torch.nn.Module):
        def forward(self, **_):
            return {"logits": scores}

    loss = ranking.listwise_loss(Fixed(), batch)
    want = (F.cross_entropy(scores[:3][None], torch.tensor([0])) + F.cross_entropy(scores[3:][None], torch.tensor([0]))) / 2
    torch.testing.assert_close(loss, want)


@pytest.fixture(scope="module")
def trained_sfts(tmp_path_factory):
    gemma = Backbone("gemma", tiny_gemma(), WordTokenizer())
    tmp_path = tmp_path_factory.mktemp("sfts")
    dirs = pipeline.ModuleDirs()
    for code in ("en", "de"):
        texts = [words(700 + i + (50 if code == "de" else 0), 12) for i in range(20)]
        language.train_language_module(gemma, code, texts, language.LanguageOptions(kind="sft", **TINY_LANG),
                                       tmp_path / f"lang-{code}")
        dirs.languages[code] = tmp_path / f"lang-{code}"
    ranking.train_ranking_module(gemma, examples(), ranking.RankingOptions(kind="sft", **TINY_RANK), tmp_path / "rank",
                                 lang_module=dirs.languages["en"])
    dirs.ranking = tmp_path / "rank"
    return dirs


def test_sft_modules_have_the_budget_of_their_adapters_and_compose_by_addition(gemma, trained_sfts):
    model = pipeline.build_reranker(gemma, systems.system("sft+both").plan("en", "de"), trained_sfts)
    assert ak.active_adapters(model) and set(pipeline.active_names(model)) == {"rank", "lang_en", "lang_de"}
    k_lang, k_rank = adapter_size(32, 2, 4), adapter_size(32, 2, 4)
    assert ak.config_of(model, "lang_de").k == k_lang and ak.config_of(model, "rank").k == k_rank
    assert ak.config_of(model, "rank").modules_to_save == ("head",)
    pairs = reranker.PairEncoder(gemma.tokenizer).encode([words(1, 3), words(3, 3)], [words(2, 5), words(4, 9)])
    with torch.no_grad():
        both = model(**pairs.inputs())["logits"]
        expected = {"sft": ["rank"], "sft+dlang": ["rank", "lang_de"], "sft+qlang": ["rank", "lang_en"]}
        singles = {}
        for name, active in expected.items():
            plan = systems.system(name).plan("en", "de")
            ak.activate(model, plan.block)
            assert sorted(pipeline.active_names(model)) == sorted(active)
            singles[name] = model(**pairs.inputs())["logits"]
        ak.fuse(model, ak.Add("rank", "lang_en", "lang_de"))  # the sum of the three deltas, fused exactly
        torch.testing.assert_close(model(**pairs.inputs())["logits"], both, rtol=1e-4, atol=1e-5)
        ak.unfuse(model)
    assert not torch.allclose(singles["sft+dlang"], singles["sft"])
    assert not torch.allclose(singles["sft+qlang"], singles["sft+dlang"])


def test_the_pool_reuses_one_model_per_ranker_and_matches_fresh_builds(gemma, trained_sfts, trained_adapters):
    pool = pipeline.RerankerPool(gemma, {"sft": trained_sfts, "adapter": trained_adapters})
    pairs = reranker.PairEncoder(gemma.tokenizer).encode([words(1, 3)], [words(2, 5)])
    for name in ("sft+dlang", "sft", "sft+both", "adapter+qlang", "adapter", "adapter+dlang"):
        plan = systems.system(name).plan("en", "de")
        pooled = pool.model_for(plan)
        fresh = pipeline.build_reranker(gemma, plan, trained_sfts if plan.ranker == "sft" else trained_adapters)
        with torch.no_grad():
            torch.testing.assert_close(pooled(**pairs.inputs())["logits"], fresh(**pairs.inputs())["logits"])
    assert set(pool.models) == {"sft", "adapter"}

"""Zero-shot cross-lingual reranking with language and ranking modules (Litschko et al., COLING 2022)
on a decoder cross-encoder: :mod:`.reranker` (models), :mod:`.language` and :mod:`.ranking`
(training), :mod:`.systems` (the evaluated compositions), :mod:`.pipeline` (rerank and score)."""

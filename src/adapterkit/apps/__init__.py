"""Applications built on the adapter methods (cross-lingual reranking, ...); never imported by the core."""

"""Tiny causal LMs for fast tests, built in code: a Llama-like chat model and a Gemma-like base model
with different tokenizers (different vocabularies, sizes and ids), so only text crosses between them."""

from __future__ import annotations

import string

import torch

PRINTABLE = list(string.ascii_letters + string.digits + string.punctuation + " \n")


def char_tokenizer(chat: bool, reverse: bool = False, extra: tuple[str, ...] = ()):
    """A character-level fast tokenizer. ``chat`` adds a chat template with ``<|end|>`` turns (Llama-
    like instruct model); otherwise the tokenizer adds ``<bos>`` and has no template (Gemma-like base)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + (["<|user|>", "<|assistant|>", "<|end|>"] if chat else [])
    chars = (PRINTABLE[::-1] if reverse else PRINTABLE) + list(extra)
    vocab = {token: i for i, token in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if not chat:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    if chat:
        fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
        fast.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>\n"
                              "{% else %}<|assistant|>{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return fast


def tiny_chat_lm(seed: int = 0):
    """``(model, tokenizer)``: a 2-layer Llama with a character chat tokenizer (the "source")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer(chat=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def tiny_base_lm(seed: int = 1):
    """``(model, tokenizer)``: a 2-layer Gemma-3 text model with another character vocabulary, no chat
    template (the "target")."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = char_tokenizer(chat=False, reverse=True, extra=("ab", "cd"))
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                              sliding_window=16, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id)
    return Gemma3ForCausalLM(config).eval(), tokenizer

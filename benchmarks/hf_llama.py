"""The benchmarks' shared model: a random-init Hugging Face Llama directory with a word-level
tokenizer covering its vocabulary, written once so that jaxalign and the peer load the same
weights (`grpo.py`, `dpo_vs_trl.py`)."""

from __future__ import annotations

import pathlib


def write_model_dir(shape, directory: pathlib.Path, positions: int) -> None:
    """A random-init (seed 0) float32 HF Llama of `shape` (`d`, `layers`, `heads`, `kv_heads`,
    `ffn`, `vocab`; untied unembedding; `positions` positions) and its tokenizer: `<pad>` 0,
    `<s>` 1 (prepended), `</s>` 2, words `w3` ... `w{vocab-1}` split on whitespace."""
    import tokenizers
    import torch
    import transformers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, shape.vocab)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(directory)
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.d,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)

"""Tiny random models of every supported family, built in memory from transformers configs
(the tiny BPE tokenizer of conftest), saved as HF folders. Weights are scaled up so the
next-token distributions are peaked: a wrong or misplaced tensor moves perplexity far."""

from __future__ import annotations

from pathlib import Path

SLIDING = 16
SCALE = {"gemma3": 4}  # Gemma scales its embeddings by √hidden itself
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)


def _configs(vocab: int, bos: int, eos: int) -> dict:
    from transformers import (
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        SmolLM3Config,
    )

    ids = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return {
        "llama3": lambda: LlamaConfig(**COMMON, **ids, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "qwen2": lambda: Qwen2Config(**COMMON, **ids, tie_word_embeddings=True),
        "qwen3": lambda: Qwen3Config(**COMMON, **ids, head_dim=32, tie_word_embeddings=True),
        "mistral": lambda: MistralConfig(**COMMON, **ids, sliding_window=None,
                                         tie_word_embeddings=False),
        "phi3": lambda: Phi3Config(**COMMON, **ids, partial_rotary_factor=0.75,
                                   tie_word_embeddings=False),
        "gemma3": lambda: Gemma3TextConfig(**COMMON, **ids, head_dim=32, query_pre_attn_scalar=32,
                                           sliding_window=SLIDING, layer_types=["sliding_attention",
                                                                           "full_attention"]),
        "smollm3": lambda: SmolLM3Config(**COMMON, **ids, no_rope_layers=[1, 0],
                                         tie_word_embeddings=True),
    }


FAMILIES = ("llama3", "qwen2", "qwen3", "mistral", "phi3", "gemma3", "smollm3")


def build_family(name: str, folder: Path, seed: int = 0) -> Path:
    import json

    import torch
    from conftest import build_tiny_tokenizer
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(folder)
    if name == "phi3":  # llama.cpp looks up <unk> in any model whose name says Phi-3
        tokenizer.add_special_tokens({"additional_special_tokens": ["<unk>"]})
        tokenizer.save_pretrained(folder)
    config = _configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)[name]()
    if name == "gemma3":
        config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() == 2:
                param.mul_(SCALE.get(name, 8))
            elif "norm" in param_name:  # norms away from their init, so their layout shows
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(folder)
    if name == "phi3":  # Phi-4-mini's BPE tokenizer class (Phi-3-mini ships SentencePiece)
        path = folder / "tokenizer_config.json"
        tokenizer_config = json.loads(path.read_text())
        tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"
        path.write_text(json.dumps(tokenizer_config))
    return folder

"""Tiny random-init Hugging Face causal LMs of many families (sdpa attention, float64), for the
zoo (test_zoo.py) and the hybrid-model mixers (test_mixers.py)."""

from __future__ import annotations

import torch

from helpers import VOCAB


def build_hf(family: str, **overrides):
    """A tiny random-init Hugging Face causal LM of ``family`` (sdpa attention, float64), its
    config changed by ``overrides``."""
    import transformers as T

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    linear_attention = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                            linear_num_key_heads=2, linear_num_value_heads=4,
                            layer_types=["linear_attention", "full_attention"])
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    configs = {
        "llama": lambda: (T.LlamaConfig(**common), T.LlamaForCausalLM),
        "llama-dynamic-rope": lambda: (
            T.LlamaConfig(**{**common, "max_position_embeddings": 16},
                          rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
            T.LlamaForCausalLM,
        ),
        "mistral-window": lambda: (T.MistralConfig(sliding_window=7, **common), T.MistralForCausalLM),
        "qwen2-window": lambda: (
            T.Qwen2Config(use_sliding_window=True, sliding_window=7, max_window_layers=1, **common), T.Qwen2ForCausalLM,
        ),
        "gemma3": lambda: (T.Gemma3TextConfig(sliding_window=7, head_dim=16, **common), T.Gemma3ForCausalLM),
        "phi3": lambda: (T.Phi3Config(pad_token_id=0, **common), T.Phi3ForCausalLM),
        "phi3-longrope": lambda: (  # N beyond original_max_position_embeddings: the long factors
            T.Phi3Config(pad_token_id=0, **common, rope_parameters={
                "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
                "long_factor": [1.0 + i / 4 for i in range(8)], "short_factor": [1.0] * 8}),
            T.Phi3ForCausalLM,
        ),
        "gpt-neox": lambda: (
            T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128, hidden_dropout=0.0,
                            attention_dropout=0.0),
            T.GPTNeoXForCausalLM,
        ),
        "gpt2": lambda: (T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, **no_dropout),
                         T.GPT2LMHeadModel),
        "olmo2": lambda: (T.Olmo2Config(**common), T.Olmo2ForCausalLM),
        "falcon": lambda: (
            T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           new_decoder_architecture=True, num_kv_heads=2, hidden_dropout=0.0, attention_dropout=0.0),
            T.FalconForCausalLM,
        ),
        "qwen3-moe": lambda: (
            T.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             output_router_logits=True, router_aux_loss_coef=0.5, **common),
            T.Qwen3MoeForCausalLM,
        ),
        "mixtral": lambda: (
            T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                            router_aux_loss_coef=0.5, **common),
            T.MixtralForCausalLM,
        ),
        # hybrid models: attention with Gated DeltaNet, Mamba2 or short-convolution layers (test_mixers.py)
        "qwen3-next": lambda: (
            T.Qwen3NextConfig(head_dim=16, **linear_attention, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=32, shared_expert_intermediate_size=32, **common),
            T.Qwen3NextForCausalLM,
        ),
        "qwen3.5": lambda: (T.Qwen3_5TextConfig(head_dim=16, **linear_attention, **common), T.Qwen3_5ForCausalLM),
        "nemotron-h": lambda: (
            T.NemotronHConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, layers_block_type=["mamba", "attention", "mlp"],
                              ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, conv_kernel=4,
                              chunk_size=8, max_position_embeddings=128),
            T.NemotronHForCausalLM,
        ),
        "zamba2": lambda: (
            T.Zamba2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, layers_block_type=["mamba", "hybrid"],
                           mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=4,
                           chunk_size=8, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=128, num_mem_blocks=1),
            T.Zamba2ForCausalLM,
        ),
        "lfm2": lambda: (T.Lfm2Config(conv_L_cache=3, layer_types=["conv", "full_attention"], **common), T.Lfm2ForCausalLM),
        "recurrent-gemma": lambda: (
            T.RecurrentGemmaConfig(num_hidden_layers=2, vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                   num_attention_heads=4, lru_width=64, block_types=["recurrent", "attention"]),
            T.RecurrentGemmaForCausalLM,
        ),
        "minimax": lambda: (
            T.MiniMaxConfig(layer_types=["linear_attention", "full_attention"], num_local_experts=2,
                            num_experts_per_tok=1, head_dim=16, block_size=4, **common),
            T.MiniMaxForCausalLM,
        ),
    }
    seq2seq = dict(  # the decoders of encoder-decoder families, as causal LMs (learned positions)
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=128,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2,
    )
    for name, config_cls, model_cls in [("bart", "BartConfig", "BartForCausalLM"), ("marian", "MarianConfig", "MarianForCausalLM"),
                                        ("pegasus", "PegasusConfig", "PegasusForCausalLM"),
                                        ("blenderbot", "BlenderbotConfig", "BlenderbotForCausalLM"),
                                        ("plbart", "PLBartConfig", "PLBartForCausalLM"), ("mbart", "MBartConfig", "MBartForCausalLM")]:
        configs[name] = lambda c=config_cls, m=model_cls: (getattr(T, c)(**seq2seq), getattr(T, m))
    configs["bert-decoder"] = lambda: (
        T.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                     is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        T.BertLMHeadModel,
    )
    configs["roberta-decoder"] = lambda: (
        T.RobertaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, is_decoder=True, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=1),
        T.RobertaForCausalLM,
    )
    config, cls = configs[family]()
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    # transformers' grouped-mm experts kernel has no float64 on CPU; its eager experts loop does
    experts = {"experts_implementation": "eager"} if family in ("qwen3-moe", "mixtral", "qwen3-next", "minimax") else {}
    return cls._from_config(config, attn_implementation="sdpa", **experts).double().train()

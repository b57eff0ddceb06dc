"""config.json-style dicts for model shapes used by the CLI, the tests and the benchmarks.

Both :func:`gptkernels.models.from_config` and transformers (``AutoConfig.for_model(**d)``) read
them, so a benchmark can build our model and HF's with the same random weights.
"""

from __future__ import annotations

#: Real model shapes (random weights in the benchmarks; no download).
PRESETS = {
    "pythia-1.4b": dict(
        model_type="gpt_neox", vocab_size=50304, hidden_size=2048, num_hidden_layers=24,
        num_attention_heads=16, intermediate_size=8192, max_position_embeddings=2048,
        rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, hidden_act="gelu",
        layer_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
    "gpt2-medium": dict(
        model_type="gpt2", vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=50256,
        eos_token_id=50256),
    "opt-1.3b": dict(
        model_type="opt", vocab_size=50272, hidden_size=2048, num_hidden_layers=24,
        num_attention_heads=32, ffn_dim=8192, max_position_embeddings=2048, word_embed_proj_dim=2048,
        do_layer_norm_before=True, activation_function="relu", pad_token_id=1, bos_token_id=2,
        eos_token_id=2),
}

#: Tiny random configs, one per family (CLI ``--tiny``, tests).
TINY = {
    "gpt2": dict(model_type="gpt2", vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                 bos_token_id=0, eos_token_id=1),
    "gpt-neo": dict(model_type="gpt_neo", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                    max_position_embeddings=128, attention_types=[[["global", "local"], 1]],
                    window_size=8, bos_token_id=0, eos_token_id=1),
    "gpt-neox": dict(model_type="gpt_neox", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                     rotary_pct=0.5, use_parallel_residual=True, bos_token_id=0, eos_token_id=1),
    "opt": dict(model_type="opt", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, ffn_dim=128, max_position_embeddings=128,
                word_embed_proj_dim=32, do_layer_norm_before=True, pad_token_id=1, bos_token_id=2,
                eos_token_id=2),
}

"""Tiny Moshi and Mimi configurations in the reference's own formats (the dicts of its
loaders.py: ``_mimi_config`` and ``_lm_kwargs``), written as ``mimi_config.json`` and
``config.json`` next to tiny random checkpoints. The published structure is kept (SEANet ratios
8, 6, 5, 4 so 1920 samples per frame, 8 + 8 codebooks, the published delays, text pad id 3) with
tiny widths, a small vocabulary and short contexts (so a few seconds of a test cross them)."""
from __future__ import annotations

TINY_MIMI = {
    "sample_rate": 24000, "channels": 1, "frame_rate": 12.5,
    "seanet": {"channels": 1, "dimension": 16, "causal": True, "n_filters": 2, "n_residual_layers": 1,
               "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0,
               "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none",
               "pad_mode": "constant", "ratios": [8, 6, 5, 4], "true_skip": True},
    "quantizer": {"dimension": 8, "n_q": 10, "bins": 32, "input_dimension": 16, "output_dimension": 16},
    "transformer": {"d_model": 16, "num_heads": 2, "num_layers": 2, "causal": True, "layer_scale": 0.01,
                    "context": 8, "conv_layout": True, "max_period": 10000, "gating": "none",
                    "norm": "layer_norm", "positional_embedding": "rope", "dim_feedforward": 32,
                    "input_dimension": 16, "output_dimensions": [16]},
}

TINY_LM = {
    "dim": 32, "text_card": 48, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8, "card": 32,
    "num_heads": 2, "num_layers": 2, "hidden_scale": 4.125, "causal": True, "layer_scale": None,
    "context": 12, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "depformer_dim": 16, "depformer_dim_feedforward": 66,
    "depformer_num_heads": 2, "depformer_num_layers": 2, "depformer_layer_scale": None,
    "depformer_multi_linear": True, "depformer_context": 8, "depformer_max_period": 10000,
    "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}

"""Mini-Omni (gpt-omni/mini-omni), re-implemented from the paper and reference code."""

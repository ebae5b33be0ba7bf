"""GLM-4-Voice (THUDM/GLM-4-Voice), re-implemented from the reference code. So far: the speech
tokenizer (audio -> 12.5 Hz discrete ids). The LLM and the decoder come next (issue #5)."""

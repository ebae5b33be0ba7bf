"""Mini-Omni2: Mini-Omni plus vision (CLIP ViT-B/32 features beside the Whisper features)."""

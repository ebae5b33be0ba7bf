"""Kyutai's Moshi: full-duplex speech-text model (Helium temporal transformer + depth
transformer) over the Mimi codec."""

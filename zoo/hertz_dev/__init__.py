"""Hertz-dev (Standard Intelligence): full-duplex audio-only base model; see model.py."""

"""The speech encoder (linked from the repository's `audio_encoder/` folder)."""

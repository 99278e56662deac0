"""Fast single-sequence inference: a static-cache decoder (`decode`) and speculative decoding
(`speculative`). The engine delegates to them for batch 1; `engine.generate_naive` stays the
oracle they are tested against."""

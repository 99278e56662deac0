"""Exports to other runtimes' formats (`gguf`: llama.cpp)."""

"""lmforge: build, run and study a language model end to end on the machine you have.

    import lmforge
    m = lmforge.load()                      # the default model (SmolLM2-135M-Instruct)
    m.chat([{"role": "user", "content": "What is the capital of France?"}])

Importing lmforge is cheap and has no side effects; torch loads on first use.
"""
__version__ = "0.1.0"


def load(model=None, **kwargs):
    """Load a model (GGUF file, HF folder, lmforge run folder; default model when None)."""
    from lmforge.api import load as _load

    return _load(model, **kwargs)


__all__ = ["load", "__version__"]

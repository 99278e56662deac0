"""The OpenAI-compatible server: `create_app(model, tokenizer, cfg)` and its scheduler.

    from lmforge.serve import ServeConfig, create_app
    app = create_app(model, tokenizer, ServeConfig(slots=8))   # then uvicorn.run(app)

Imported only by the `serve` command and the tests (it pulls in FastAPI).
"""
from lmforge.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]

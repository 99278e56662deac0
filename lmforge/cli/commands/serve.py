"""Serve a model over an OpenAI-compatible HTTP API, with a web chat page at /."""
from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass

from lmforge.cli.common import ModelArgs, load_lm, runtime_summary
from lmforge.errors import LmforgeError
from lmforge.serve.app import ServeConfig


@dataclass
class Config(ModelArgs, ServeConfig):
    log_level: str = "info"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(cfg: Config) -> None:
    import uvicorn

    from lmforge.serve import create_app

    if not 1 <= cfg.slots <= 256:
        raise LmforgeError(f"--slots must be between 1 and 256, got {cfg.slots}")
    if cfg.ctx < 16:
        raise LmforgeError(f"--ctx must be at least 16 tokens, got {cfg.ctx}")
    if not cfg.api_key and os.environ.get("LMFORGE_API_KEY"):
        cfg.api_key = os.environ["LMFORGE_API_KEY"]  # keeps the key out of the process list
    lm = load_lm(cfg)
    app = create_app(lm.model, lm.tokenizer, cfg)
    sched = app.state.scheduler
    if not _is_loopback(cfg.host) and not cfg.api_key:
        print(f"warning: serving on {cfg.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    mc = lm.model.cfg
    kv_mb = 2 * mc.n_layers * sched.slots * mc.n_kv_heads * (sched.ctx + 1) * mc.head_dim * lm.model.lm_head.weight.element_size() / 2**20
    print(f"serving {app.state.model_id} on http://{cfg.host}:{cfg.port}  ({sched.slots} slots x {sched.ctx} tokens, "
          f"KV cache {kv_mb:.0f} MiB; {runtime_summary(lm, cfg)}; chat page at /, API at /v1)", file=sys.stderr)
    serve_on_threads(app, uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)))


def serve_on_threads(app, server) -> None:
    """The model's scheduler on this (main) thread, the HTTP server on another: the thread that
    loaded the model keeps its OpenMP work (`Scheduler.run_here` says why)."""
    import threading

    sched = app.state.scheduler
    sched.claim_current_thread()
    http = threading.Thread(target=server.run, name="lmforge-http", daemon=True)
    http.start()
    watcher = threading.Thread(target=lambda: (http.join(), sched.stop()), daemon=True)
    watcher.start()  # the server ending (startup failed, or shut down) ends the scheduler
    try:
        sched.run_here()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        sched.stop()
        http.join(10)
    if not server.started:
        raise LmforgeError(f"the HTTP server did not start on {server.config.host}:{server.config.port} (its log above says why)")

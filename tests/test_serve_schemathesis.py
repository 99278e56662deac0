"""`schemathesis run --checks all` against the real server on 127.0.0.1: every operation of its
OpenAPI document through the examples, coverage (boundary values, wrong types, unexpected methods),
fuzzing and stateful phases, every response through every check. A failure is a place where the
server and its document disagree. Bounded and derandomized: the same ~1000 requests every run,
about 20 s on two cores.

The CLI runs in this process (click's runner): the server is a thread of it, and the one check
adjusted below is a function here."""
from __future__ import annotations

import pytest
import torch

from conftest import live_server, tiny_config

schemathesis = pytest.importorskip("schemathesis")

from click.testing import CliRunner  # noqa: E402
from schemathesis.cli import schemathesis as st_cli  # noqa: E402
from schemathesis.openapi.checks import RejectedPositiveData  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

MAX_EXAMPLES = 15  # per operation when fuzzing; the coverage phase adds its boundary cases on top

CONFIG = """
[cache]
enabled = false  # write nothing into the checkout

# 413 rejects too: a body over the server's byte limit is refused before its fields are read
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

# and a schema-valid body can be over that limit: JSON Schema counts characters, not bytes
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "413", "429", "5xx"]
"""


POSITIVE_CHECKED = []  # responses the adjusted check saw: proof that `--checks all` ran it


@schemathesis.check  # (registered: `--checks all` is every registered check)
def positive_data_acceptance_beyond_schema(ctx, response, case):
    """positive_data_acceptance (the run excludes the plain one), except for a 400 from a rule JSON
    Schema cannot state, which names its field: the prompt's length in tokens against the context,
    token ids beyond the vocabulary, n beyond the server's slots, fields that only go together
    (top_logprobs needs logprobs, tool_choice needs tools...), parts of OpenAI's API lmforge does
    not serve (image content, suffix). The body validator's own 400 (code "invalid_value") still
    fails it: a body the document allows must pass the server's request model."""
    POSITIVE_CHECKED.append(response.status_code)
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        error = response.json()["error"] if response.status_code == 400 else {}
        if error.get("param") and error.get("code") != "invalid_value":
            return None
        raise


@pytest.fixture(scope="module")
def server():
    """uvicorn serving a tiny random model with the default model's tokenizer."""
    from lmforge.loading import load_tokenizer
    from lmforge.loading.resolve import default_model_path
    from lmforge.model import Transformer
    from lmforge.serve import ServeConfig, create_app

    if default_model_path() is None:
        pytest.skip("default model (its tokenizer) not installed")
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=256)).init_weights(seed=0).eval()
    # a short default reply keeps the requests that name no max_tokens fast; ctx bounds the rest
    app = create_app(model, tokenizer, ServeConfig(slots=4, ctx=256, model_id="tiny", max_tokens_default=16))
    with live_server(app) as url:
        yield url


def test_schemathesis_run_all_checks(server, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    args = ["--config-file", str(config), "run", server + "/openapi.json",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
            "--workers", "1", "--request-timeout", "60",
            "--continue-on-failure", "--no-color"]
    result = CliRunner().invoke(st_cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output
    assert "No issues found" in result.output and POSITIVE_CHECKED, result.output

"""`duet serve --quantization int8` end to end, through the official openai client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest
from server_process import running_server

JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]


@pytest.mark.slow
def test_server_serves_int8(tmp_path: Path) -> None:
    log = tmp_path / "duet.log"
    args = ["--quantization", "int8", "--max-model-len", "512", "--kv-cache-memory", "128MiB",
            "--max-num-seqs", "4"]  # fmt: skip
    with running_server(args, log) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(
            model=model, messages=JAPAN, temperature=0.0, max_tokens=16
        )
        assert chat.choices[0].message.content == "The capital of Japan is Tokyo."
        stream = client.completions.create(
            model=model, prompt="The sea is", max_tokens=12, temperature=0.0, stream=True
        )
        streamed = "".join(chunk.choices[0].text for chunk in stream)
        whole = client.completions.create(
            model=model, prompt="The sea is", max_tokens=12, temperature=0.0
        )
        assert streamed == whole.choices[0].text and streamed
    assert "int8: 121 linears quantized" in log.read_text()


def test_serve_rejects_an_unknown_quantization() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from frontend.cli import main; main()", "serve",
         "--quantization", "int4"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--quantization" in done.stderr and "invalid choice: 'int4'" in done.stderr
    assert "Traceback" not in done.stderr

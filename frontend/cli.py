"""The `duet` console script: `duet serve [MODEL]`, `duet frontend --engine ADDRESS`,
`duet keys DIR` (CURVE keys for multi-host links) and `duet bench serve` (the load generator
in frontend/bench).

Flag names and meanings follow `vllm serve`. This module stays light to import (no torch,
no aiohttp): the processes it launches load the heavy parts themselves.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import replace

from engine_core.memory import available_memory, kv_memory_problem
from engine_core.messages.config import QUANTIZATIONS, EngineConfig, parse_size
from engine_core.messages.curve import add_curve_keys_argument
from engine_core.messages.speculative import SpeculativeConfig, parse_speculative_config
from frontend.bench.args import DESCRIPTION as BENCH_DESCRIPTION
from frontend.bench.args import add_arguments as add_bench_arguments
from frontend.lora_args import add_lora_arguments, check_lora_modules
from frontend.settings import TOOL_CALL_PARSERS, FrontendSettings, setup_logging
from models.cpu_features import describe as describe_cpu
from models.cpu_features import resolve_dtype

_DTYPES = {"auto": "auto", "float": "float32", "float32": "float32", "half": "float16",
           "float16": "float16", "bfloat16": "bfloat16"}  # fmt: skip
_WORKER_COMMANDS = {"prefill-worker": "prefill", "decode-worker": "decode"}
_LENGTH = re.compile(r"^(\d+)([kKmM]?)$")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `duet` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _WORKER_COMMANDS:
        # the worker has its own parser (and --help); argparse would swallow its flags
        from decode_workers.remote import main as join

        join(_WORKER_COMMANDS[argv[0]], argv[1:])
        return
    args = build_parser().parse_args(argv)
    setup_logging("duet")
    if getattr(args, "curve_keys", None):
        _check_keys(args.curve_keys)
    sys.exit(args.run(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duet", description="An LLM inference server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible API")
    serve.add_argument("model", nargs="?", help="a .gguf file or a Hugging Face folder "
                       "(default: the embedded SmolLM2-135M-Instruct)")  # fmt: skip
    serve.add_argument("--model", dest="model_option", help="same as the positional MODEL")
    _add_http_args(serve)
    _add_engine_args(serve)
    add_lora_arguments(serve, _positive)
    add_curve_keys_argument(serve)
    serve.set_defaults(run=_serve)
    frontend = commands.add_parser("frontend", help="run frontends against a remote engine core")
    frontend.add_argument("model", nargs="?", help="the model the core serves (for its tokenizer)")
    frontend.add_argument("--model", dest="model_option", help="same as the positional MODEL")
    frontend.add_argument("--engine", required=True, metavar="ADDRESS",
                          help="the core's frontend socket, e.g. tcp://10.0.0.5:5570")  # fmt: skip
    _add_http_args(frontend)
    add_lora_arguments(frontend, _positive)
    add_curve_keys_argument(frontend)
    frontend.set_defaults(run=_frontend)
    for role in ("prefill", "decode"):
        worker = commands.add_parser(f"{role}-worker", add_help=False,
                                     help=f"join a running core as a {role} worker (see --help)")  # fmt: skip
        worker.add_argument("worker_args", nargs=argparse.REMAINDER)
    keys = commands.add_parser("keys", help="write CURVE key pairs for links between hosts")
    keys.add_argument("directory", help="where to write server.key[_secret], client.key[_secret]")
    keys.set_defaults(run=_keys)
    export = commands.add_parser("export-model", help="write a model as a Hugging Face folder")
    export.add_argument("folder", help="where to write config.json, model.safetensors, tokenizer")
    export.add_argument("--model", dest="model_option", default=None,
                        help="a .gguf file or HF folder (default: the embedded SmolLM2-135M-Instruct)")  # fmt: skip
    export.set_defaults(run=_export_model)
    bench = commands.add_parser("bench", help="benchmark a running server")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    bench_serve = benchmarks.add_parser(
        "serve", help=BENCH_DESCRIPTION, description=BENCH_DESCRIPTION
    )
    add_bench_arguments(bench_serve)
    bench_serve.set_defaults(run=_bench_serve)
    return parser


def _add_http_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default=None, help="address to listen on (default: all interfaces)")
    add("--port", type=int, default=8000)
    add("--api-key", default=os.environ.get("DUET_API_KEY"),
        help="require `Authorization: Bearer KEY` (default: $DUET_API_KEY)")  # fmt: skip
    add("--served-model-name", default=None, help="the model name the API reports and accepts")
    add("--max-model-len", type=_length, default=None,
        help="context length in tokens, e.g. 4096 or 4K (default: the model's)")  # fmt: skip
    add("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    add("--enable-auto-tool-choice", action="store_true",
        help='tool_choice "auto": the model decides, a --tool-call-parser finds its calls')  # fmt: skip
    add("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
        help="how tool calls look in the model's free text (hermes: <tool_call>{...})")  # fmt: skip
    add("--api-server-count", type=_positive, default=1,
        help="frontend processes sharing the port (SO_REUSEPORT)")  # fmt: skip
    add("--disable-log-requests", action="store_true", help="no log line per request")
    add("--max-waiting-requests", type=_positive, default=None,
        help="answer 429 while this many requests wait to be scheduled")  # fmt: skip
    add("--shutdown-timeout", type=float, default=FrontendSettings.shutdown_timeout,
        help="seconds requests in flight get to finish on SIGTERM; then their streams "
        "end with an error event")  # fmt: skip


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    add, default = parser.add_argument, EngineConfig()
    add("--max-num-seqs", type=_positive, default=default.max_num_seqs)
    add("--max-num-batched-tokens", type=_positive, default=default.max_num_batched_tokens)
    add("--block-size", type=_positive, default=default.block_size)
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
        default=default.enable_prefix_caching)  # fmt: skip
    add("--dtype", choices=sorted(_DTYPES), default="auto",
        help="auto = bfloat16 on CPUs with native bf16 (AVX512_BF16, AMX), else float32")  # fmt: skip
    add("--kv-cache-dtype", choices=["auto", "bfloat16", "float32"], default="auto",
        help="auto = the model's dtype")  # fmt: skip
    add("--quantization", "-q", choices=QUANTIZATIONS, default=None,
        help="int8: per-channel int8 weights quantized at load, int8 kernels chosen for "
             "the CPU (default: none)")  # fmt: skip
    add("--kv-cache-memory", type=parse_size, default=default.kv_cache_memory,
        help="KV cache size per worker pool, e.g. 2GiB")  # fmt: skip
    add("--colocated", action=argparse.BooleanOptionalAction, default=None,
        help="one worker runs prefill and decode in mixed batches (the default unless "
             "--prefill-workers or --decode-workers is given)")  # fmt: skip
    add(
        "--prefill-workers",
        type=_non_negative,
        default=None,
        help=f"local prefill workers (default {default.prefill_workers}; 0: remote ones only)",
    )
    add(
        "--decode-workers",
        type=_non_negative,
        default=None,
        help=f"local decode workers (default {default.decode_workers}; 0: remote ones only)",
    )
    add("--kv-transfer-timeout", type=float, default=default.kv_transfer_timeout,
        help="seconds before a KV hand-off is given up and the prompt recomputed")  # fmt: skip
    add("--worker-address", default=None, metavar="ADDRESS",
        help="bind the core's worker socket here (e.g. tcp://0.0.0.0:5571) so that "
             "`duet prefill-worker/decode-worker --engine` can join from other hosts")  # fmt: skip
    add("--kv-connector", choices=["shm", "torch", "tcp"], default=default.kv_connector)
    add("--speculative-config", type=_speculative_config, default=None, metavar="JSON",
        help='n-gram speculative decoding, as vLLM takes it: \'{"method": "ngram", '
             '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\'')  # fmt: skip
    add("--async-scheduling", action=argparse.BooleanOptionalAction,
        default=default.async_scheduling,
        help="plan the next engine step while the worker runs this one (colocated, "
             "without speculative decoding; otherwise it stays off)")  # fmt: skip
    add("--engine-address", default=None, metavar="ADDRESS",
        help="bind the core's frontend socket here (e.g. tcp://0.0.0.0:5570) so that "
             "`duet frontend --engine` can join from other hosts (default: private ipc)")  # fmt: skip


def _frontend_settings(args: argparse.Namespace, engine_address: str) -> FrontendSettings:
    return FrontendSettings(
        engine_address=engine_address,
        model=args.model or args.model_option,
        served_model_name=args.served_model_name,
        chat_template=args.chat_template,
        tool_call_parser=_tool_call_parser(args),
        max_model_len=args.max_model_len,
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_waiting_requests=args.max_waiting_requests,
        log_requests=not args.disable_log_requests,
        curve_keys=args.curve_keys,
        shutdown_timeout=args.shutdown_timeout,
        enable_lora=args.enable_lora,
        lora_modules=tuple(args.lora_modules or ()),
        max_lora_rank=args.max_lora_rank,
        max_loras=args.max_loras,
    )


def _tool_call_parser(args: argparse.Namespace) -> str | None:
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SystemExit("duet: --enable-auto-tool-choice needs --tool-call-parser")
    return args.tool_call_parser if args.enable_auto_tool_choice else None


def _serve(args: argparse.Namespace) -> int:
    from frontend.launcher import serve

    default = EngineConfig()
    config = EngineConfig(
        model=args.model or args.model_option,
        served_model_name=args.served_model_name,
        dtype=resolve_dtype(_DTYPES[args.dtype]),
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_memory=args.kv_cache_memory,
        colocated=_colocated(args),
        prefill_workers=default.prefill_workers
        if args.prefill_workers is None
        else args.prefill_workers,
        decode_workers=default.decode_workers
        if args.decode_workers is None
        else args.decode_workers,
        kv_transfer_timeout=args.kv_transfer_timeout,
        worker_address=args.worker_address,
        kv_connector=args.kv_connector,
        max_waiting_requests=args.max_waiting_requests,
        enable_lora=args.enable_lora,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
        speculative_config=args.speculative_config,
        async_scheduling=args.async_scheduling,
    )
    check_lora_modules(args)
    problem = kv_memory_problem(config, available_memory())
    if problem is not None:
        raise SystemExit(f"duet: {problem}")
    logging.getLogger("duet").info(
        "dtype %s (--dtype %s; CPU: %s)", config.dtype, args.dtype, describe_cpu()
    )
    # the launcher fills in the core's address once it has made its socket directory
    settings = replace(_frontend_settings(args, engine_address=""), dtype=config.dtype)
    return serve(config, settings, args.api_server_count, args.engine_address)


def _frontend(args: argparse.Namespace) -> int:
    from frontend.launcher import serve_frontends

    return serve_frontends(_frontend_settings(args, args.engine), args.api_server_count)


def _check_keys(directory: str) -> None:
    """Fail at once, in the terminal, on a key directory no process could use."""
    from engine_core.messages.curve import CurveKeyError, load_keys

    try:
        load_keys(directory)
    except CurveKeyError as exc:
        sys.exit(f"duet: {exc}")


def _keys(args: argparse.Namespace) -> int:
    from engine_core.messages.curve import generate_keys

    try:
        written = generate_keys(args.directory)
    except FileExistsError as exc:
        print(f"duet: {exc.filename} exists; remove the old keys first", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    print("copy the directory to every host and pass --curve-keys to every role; hosts "
          "that only run frontends do not need server.key_secret")  # fmt: skip
    return 0


def _export_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.export import export_hf_folder
    from models.loader import ModelLoadError, resolve_model

    try:
        folder = export_hf_folder(resolve_model(args.model_option), Path(args.folder))
    except ModelLoadError as exc:
        print(f"duet: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from frontend.bench.cli import run

    return run(args)


def _colocated(args: argparse.Namespace) -> bool:
    """Colocated unless asked for, explicitly or by naming a worker pool's size."""
    if args.colocated is not None:
        return args.colocated
    return args.prefill_workers is None and args.decode_workers is None


def _speculative_config(text: str) -> SpeculativeConfig | None:
    try:
        return parse_speculative_config(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _length(text: str) -> int:
    """vLLM's lengths: 4096, 4k (= 4000) or 4K (= 4096); m/M likewise."""
    match = _LENGTH.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a length: {text!r} (try 4096 or 4K)")
    number, unit = int(match.group(1)), match.group(2)
    scale = {"": 1, "k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}[unit]
    return _positive(str(number * scale))

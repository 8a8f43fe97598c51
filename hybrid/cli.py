"""The `hybrid` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import ConfigError, CheckpointError
from .presets import MODEL_PRESETS


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .tokenizer import StreamDecoder, Tokenizer

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model, **_engine_options(args))
    tokenizer = Tokenizer(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    _print_plan_notes(engine)
    ids = tokenizer.encode(args.prompt)
    stop = [i for i in (tokenizer.eos_id, tokenizer.special.get("<|im_end|>")) if i is not None]
    print(args.prompt, end="", flush=True)
    t0 = time.perf_counter()
    first, out, text = None, [], StreamDecoder(tokenizer)
    for token in engine.generate(ids, args.max_new_tokens, args.temperature, args.top_p, args.seed, stop):
        first = first or time.perf_counter()
        out.append(token)
        print(text(token), end="", flush=True)
    end = time.perf_counter()
    print(text.flush(), end="")
    first = first or end
    decode_tps = (len(out) - 1) / (end - first) if len(out) > 1 else 0.0
    print(f"\n\n[prompt {len(ids)} tokens, prefill {first - t0:.2f} s; {len(out)} new tokens, "
          f"decode {decode_tps:.1f} tokens/s]", file=sys.stderr)  # fmt: skip
    if engine.tier_report():
        print(f"[{engine.tier_report()}]", file=sys.stderr)
    if engine.last_cached_tokens:
        print(f"[{engine.last_cached_tokens} prompt tokens from the prefix cache]", file=sys.stderr)
    engine.close_prefix_cache()  # with --prefix-cache-dir, the next run starts warm
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from .config import ModelConfig
    from .placement import PlanError, checkpoint_dtypes, format_plan, parse_bytes, plan

    if args.preset:
        cfg, dtypes, source = ModelConfig.from_dict(MODEL_PRESETS[args.preset], args.preset), None, args.preset
    else:
        cfg, source = ModelConfig.from_file(args.model), args.model
        dtypes = checkpoint_dtypes(args.model, cfg.tensor_prefix)
    gbs = args.host_read_gbs
    if gbs is None:
        import numpy as np

        from cpu_kernels.stream import read_bandwidth

        gbs = read_bandwidth([np.ones(2 << 30, np.uint8)])
    disk_gbs = args.disk_read_gbs
    if disk_gbs is None and args.model:
        from .tiers import disk_read_bandwidth

        disk_gbs = disk_read_bandwidth(sorted(Path(args.model).glob("*.safetensors")))
    try:
        p = plan(cfg, parse_bytes(args.gpu_mem), parse_bytes(args.host_mem), args.context, gbs, dtypes,
                 disk_read_gbs=disk_gbs or 0.0, gpu_weights=args.gpu_weights)  # fmt: skip
    except PlanError as e:
        print(f"hybrid plan: {source}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(p.to_dict(), indent=2) if args.json else f"plan for {source}\n{format_plan(p)}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat_cli import ChatLoop
    from .conversation import ChatSession

    import json

    tools = json.loads(Path(args.tools).read_text()) if args.tools else None
    session = ChatSession.open(args.model, max_context=args.max_context, **_engine_options(args))
    _print_plan_notes(session.engine)
    try:
        return ChatLoop(session, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        tools=tools).run()  # fmt: skip
    finally:
        session.engine.close_prefix_cache()


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from .conversation import ChatSession
    from .server import Server, create_app

    session = ChatSession.open(args.model, max_context=args.max_context, **_engine_options(args))
    name = args.model_name or Path(args.model).resolve().name
    app = create_app(Server(session, name, api_key=args.api_key, max_queue=args.max_queue,
                            max_request_bytes=args.max_request_bytes))  # fmt: skip
    print(f"serving '{name}' on http://{args.host}:{args.port}/v1 (context {session.max_context})", file=sys.stderr)
    _print_plan_notes(session.engine)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        session.engine.close_prefix_cache()
    return 0


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--gpu-mem", help="GPU budget, e.g. 22GiB (default: what is free)")
    parser.add_argument("--host-mem", help="host RAM budget, e.g. 500GiB (default: what is available); below the "
                        "routed experts' size the rest are read from the checkpoint when needed")  # fmt: skip
    _add_gpu_weights_option(parser)
    parser.add_argument("--prefix-cache-mem", help="host RAM for the latents of earlier requests, reused by requests "
                        "that start the same way (default: half the RAM the plan leaves free, at most 16GiB; 0: off)")
    parser.add_argument("--prefix-cache-dir", help="also keep cached prefixes in this directory across restarts")
    parser.add_argument("--fast-experts", action="store_true", help="decode the CPU experts with rounded activations "
                        "(bf16 for fp8 experts, int8 per group for INT4): faster where cores are short of compute, "
                        "slightly different numbers (README: fast mode)")  # fmt: skip


def _add_gpu_weights_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-weights", choices=("bf16", "fp8"), default="bf16",
                        help="INT4 checkpoints: keep the bf16 linears outside the routed experts as bf16 (default) or "
                        "requantize them to block-fp8 at load, for a card that cannot hold them")  # fmt: skip


def _print_plan_notes(engine) -> None:
    """What the budgets changed (disk tier, embeddings off the GPU), so a slow start is not a mystery."""
    for note in engine.plan.notes if engine.plan else ():
        print(f"note: {note}", file=sys.stderr)


def _engine_options(args: argparse.Namespace) -> dict:
    return {"device": args.device, "gpu_mem": args.gpu_mem, "host_mem": args.host_mem, "gpu_weights": args.gpu_weights,
            "prefix_cache_mem": args.prefix_cache_mem, "prefix_cache_dir": args.prefix_cache_dir,
            "fast_experts": args.fast_experts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hybrid", description="Kimi-K2 on one box: GPU attention, CPU experts.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a continuation of a prompt and report tokens/s")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    _add_engine_options(g)
    g.set_defaults(func=cmd_generate)
    pl = sub.add_parser("plan", help="where every part of the model goes for given budgets, and how fast it decodes")
    src = pl.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(MODEL_PRESETS))
    src.add_argument("--model", help="checkpoint directory (reads config.json and safetensors headers only)")
    pl.add_argument("--gpu-mem", required=True, help="GPU memory budget, e.g. 24GiB")
    pl.add_argument("--host-mem", required=True, help="host RAM budget, e.g. 1100GiB")
    pl.add_argument("--context", type=int, default=32768, help="tokens of KV cache to provide (default 32768)")
    pl.add_argument("--host-read-gbs", type=float, help="host read bandwidth in GB/s (default: measure it, ~2 s)")
    pl.add_argument("--disk-read-gbs", type=float,
                    help="checkpoint disk read bandwidth in GB/s (default with --model: measure it, cold cache)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    _add_gpu_weights_option(pl)
    pl.set_defaults(func=cmd_plan)
    ch = sub.add_parser("chat", help="chat in the terminal, streamed, with /commands")
    ch.add_argument("--model", required=True, help="checkpoint directory")
    ch.add_argument("--max-tokens", type=int, default=1024, help="per answer (default 1024)")
    ch.add_argument("--temperature", type=float, default=0.6, help="default 0.6, as Moonshot recommends for K2")
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--max-context", type=int, help="tokens of conversation (default min(model, 8192))")
    ch.add_argument("--tools", help="JSON file with OpenAI-style tool definitions to declare to the model")
    _add_engine_options(ch)
    ch.set_defaults(func=cmd_chat)
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /health)")
    sv.add_argument("--model", required=True, help="checkpoint directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    sv.add_argument("--max-queue", type=int, default=8,
                    help="requests being prepared, queued or generated before 429 (default 8)")
    sv.add_argument("--max-context", type=int, help="prompt + completion tokens per request (default min(model, 8192))")
    sv.add_argument("--model-name", help="model id clients send (default: the directory name)")
    sv.add_argument("--max-request-bytes", type=int, default=16 << 20,
                    help="largest request body accepted; larger ones get 413 (default 16 MiB)")
    _add_engine_options(sv)
    sv.set_defaults(func=cmd_serve)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"hybrid: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

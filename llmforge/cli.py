"""`llmforge <verb>`: one subcommand per stage. Thin: parse, resolve the config, call the stage.

    llmforge speedrun --preset cpu --out runs/cpu
    llmforge data prepare --out runs/x --preset micro --set data.near_threshold=0.9
    llmforge pretrain --out runs/x --minutes 10 [--resume]
    llmforge vision --out runs/x                 # after sft: images in, answers out
    llmforge generate runs/x --prompt "def fib(n):" --max-tokens 64

Every stage verb takes --out RUN_DIR, --preset NAME, --config FILE.toml and repeatable
--set key=value (a bare --section.key=value works too). Errors a user can cause print one
line and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from llmforge import config as config_mod
from llmforge.errors import UserError
from llmforge.run import RunDir, write_text_atomic


STAGE_VERBS = ("data", "tokenizer", "pretrain", "sft", "rm", "rl", "vision", "eval", "speedrun", "scaling", "flywheel")


def _stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (created if missing)")
    p.add_argument("--preset", default=None, help=f"one of {', '.join(config_mod.PRESETS)} (default: the run's, else cpu)")
    p.add_argument("--config", default=None, help="TOML file with config sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. pretrain.lr=1e-3")


def _lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA (train low-rank adapters of a frozen base)")
    g.add_argument("--lora-rank", type=int, default=None, help="adapter rank; 0 = full fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=None, help="adapter scale is alpha / rank")
    g.add_argument("--lora-targets", default=None, help="comma-separated Linear names or all-linear")
    g.add_argument("--lora-dtype", default=None, help="frozen base precision: fp32 | bf16 | int8 | nf4")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmforge", description="Raw text to an aligned, served assistant.")
    sub = ap.add_subparsers(dest="verb", required=True)

    data = sub.add_parser("data", help="data pipeline").add_subparsers(dest="action", required=True)
    _stage_args(data.add_parser("prepare", help="sources -> clean -> dedup -> mix -> tokenizer -> shards"))
    tok = sub.add_parser("tokenizer", help="BPE tokenizer").add_subparsers(dest="action", required=True)
    _stage_args(tok.add_parser("train", help="(re)train the tokenizer on the run's cleaned documents"))
    _stage_args(tok.add_parser("report", help="fertility (tokens per char and per byte) per language"))

    p = sub.add_parser("pretrain", help="train the base model")
    _stage_args(p)
    p.add_argument("--resume", action="store_true", help="continue from ckpt/base's train state")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (overrides pretrain.minutes)")
    for verb, text in (("sft", "supervised fine-tuning"), ("rm", "reward models"), ("eval", "evaluate checkpoints")):
        p = sub.add_parser(verb, help=text)
        _stage_args(p)
        if verb != "eval":
            p.add_argument("--resume", action="store_true")
            _lora_args(p)
    p = sub.add_parser("vision", help="teach the SFT model to see: align an image encoder, then tune on visual questions")
    _stage_args(p)
    p.add_argument("--resume", action="store_true")
    p = sub.add_parser("rl", help="RLHF: rejection sampling, PPO, DPO or GRPO")
    _stage_args(p)
    p.add_argument("--algo", choices=["rejection", "ppo", "dpo", "grpo"], default=None)
    _lora_args(p)
    scaling = sub.add_parser("scaling", help="scaling laws: sweep sizes x budgets, fit, plan").add_subparsers(
        dest="action", required=True)
    _stage_args(scaling.add_parser("sweep", help="train a grid of model sizes per compute budget (resumable)"))
    _stage_args(scaling.add_parser("fit", help="Chinchilla approaches 2 and 3 with bootstrap intervals"))
    p = scaling.add_parser("plan", help="recommend model, tokens, batch and lr for a budget")
    _stage_args(p)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock budget on this machine")
    budget.add_argument("--flops", type=float, help="compute budget C = 6 N D")
    p = sub.add_parser("flywheel", help="rounds of serve -> users' edits and ratings -> DPO -> held-out eval")
    _stage_args(p)
    p.add_argument("--rounds", type=int, default=None, help="rounds to run (default flywheel.rounds); finished ones are skipped")
    p.add_argument("--feedback-db", default=None, metavar="URL",
                   help="train the next round on this feedback store (SQLite path or postgresql:// URL) instead of simulated users")
    p = sub.add_parser("speedrun", help="every stage in order, skipping finished ones; writes report.md")
    _stage_args(p)
    p.set_defaults(out=None)
    for a in p._actions:
        if a.dest == "out":
            a.required, a.default = False, None

    p = sub.add_parser("plan-memory", help="per-rank bytes of params, grads, optimizer state and activations")
    p.add_argument("--preset", default="cpu", help=f"one of {', '.join(config_mod.PRESETS)}")
    p.add_argument("--config", default=None, help="TOML file with config sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. pretrain.batch_size=8")
    p.add_argument("--stage", choices=["pretrain", "sft", "rm"], default="pretrain", help="whose train config")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default=None, help="default: the stage's train.parallel")
    p.add_argument("--world", type=int, default=1, help="ranks in all (nodes x GPUs per node)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="compute dtype of activations")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="memory of one GPU, e.g. 80GiB: say if it fits")
    p = sub.add_parser("consolidate", help="write model.safetensors of a sharded (fsdp) checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder with a sharded/ subfolder")

    p = sub.add_parser("generate", help="sample from a checkpoint")
    p.add_argument("model", help="checkpoint folder or run directory (latest of rl > sft > base)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-n", "--num-samples", type=int, default=1)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat format")
    _inference_args(p)

    p = sub.add_parser("chat", help="terminal chat with streaming")
    p.add_argument("model")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    _inference_args(p)
    p = sub.add_parser("serve", help="OpenAI-compatible API + web chat")
    p.add_argument("model")
    _inference_args(p, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default=None, help="feedback store: SQLite path or postgresql:// URL")
    p.add_argument("--index", default=None, help="retrieval index (SQLite) to enable RAG")
    p.add_argument("--api-key", action="append", default=None, metavar="[NAME=]KEY",
                   help="an API key (repeatable; each key is a user); also $LLMFORGE_API_KEYS. "
                        "Without keys the server answers on 127.0.0.1 only")

    p = sub.add_parser("export", help="export a checkpoint (hf | gguf)")
    p.add_argument("model")
    p.add_argument("--format", choices=["hf", "gguf"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    p = sub.add_parser("import", help="import a Hugging Face model directory")
    p.add_argument("hf_dir")
    p.add_argument("--out", required=True, help="checkpoint folder to write")

    idx = sub.add_parser("index", help="retrieval index").add_subparsers(dest="action", required=True)
    p = idx.add_parser("add", help="chunk, embed and store documents")
    p.add_argument("paths", nargs="+", help="files, globs, or 'pydoc' for the built-in pydoc topics")
    p.add_argument("--db", default="index.sqlite")
    p.add_argument("--model", default=None, help="checkpoint whose hidden states embed when MiniLM is not installed")
    fb = sub.add_parser("feedback", help="feedback store").add_subparsers(dest="action", required=True)
    p = fb.add_parser("export", help="write preference pairs from the feedback store")
    p.add_argument("--db", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--user", action="append", default=None, metavar="NAME",
                   help="keep only this user's pairs (repeatable; names as in `llmforge serve --api-key NAME=KEY`)")
    p.add_argument("--max-per-user", type=int, default=None, metavar="N",
                   help="keep at most N pairs per user, so one user cannot flood the next training set")
    return ap


def resolve_config(args, extra: list[str]) -> tuple[config_mod.Config, RunDir]:
    overrides = list(args.set)
    for item in extra:
        if not (item.startswith("--") and "=" in item):
            raise UserError(f"unrecognized argument '{item}'; overrides look like --set section.key=value")
        overrides.append(item[2:])
    section = {"sft": "sft", "rm": "rm", "rl": "rl"}.get(args.verb)
    for name in ("rank", "alpha", "targets", "dtype"):
        value = getattr(args, f"lora_{name}", None)
        if section and value is not None:
            overrides.append(f"{section}.lora_{name}={value}")
    run = RunDir(args.out)
    cfg = config_mod.resolve(args.preset, args.config, overrides, run_dir=run.root)
    return cfg, run


@contextlib.contextmanager
def recorded_config(cfg, run: RunDir, speedrun: bool = False):
    """Record cfg as the run's config.toml while its stage runs. If the stage refuses it
    (a UserError: bad --set, resume mismatch), put back the previous file: a config that
    never ran must not become the run's recorded config that later commands inherit. A
    speedrun keeps it: its earlier stages did run with it."""
    path = run.root / "config.toml"
    main_rank = int(os.environ.get("RANK", 0)) == 0
    previous = path.read_text(encoding="utf-8") if path.is_file() else None
    if main_rank:
        run.create()
        config_mod.save(cfg, run.root)
    try:
        yield
    except UserError:
        if main_rank and not speedrun:
            if previous is None:
                path.unlink(missing_ok=True)
            else:
                write_text_atomic(path, previous)
        raise


def run_stage(verb, args, cfg, run) -> None:
    if verb == "data":
        from llmforge.data.prepare import prepare
        prepare(cfg, run)
    elif verb == "tokenizer" and args.action == "report":
        from llmforge.tokenizer import report
        report.run(run)
    elif verb == "tokenizer":
        from llmforge.data.prepare import train_tokenizer
        train_tokenizer(cfg, run)
    elif verb == "pretrain":
        from llmforge.stages import pretrain
        pretrain.run(cfg, run, resume=args.resume)
    elif verb == "sft":
        from llmforge.stages import sft
        sft.run(cfg, run, resume=args.resume)
    elif verb == "rm":
        from llmforge.stages import reward
        reward.run(cfg, run, resume=args.resume)
    elif verb == "vision":
        from llmforge.stages import vision
        vision.run(cfg, run, resume=args.resume)
    elif verb == "rl":
        from llmforge.stages import rl
        rl.run(cfg, run, algo=cfg.rl.algo)
    elif verb == "eval":
        from llmforge.stages import evaluation as eval_stage
        eval_stage.run(cfg, run)
    elif verb == "flywheel":
        from llmforge.stages import flywheel
        flywheel.run(cfg, run, rounds=args.rounds, feedback_db=args.feedback_db)
    elif verb == "speedrun":
        from llmforge.stages import speedrun
        speedrun.run(cfg, run)
    elif verb == "scaling":
        from llmforge.scaling import fit, plan, sweep
        if args.action == "sweep":
            sweep.run(cfg, run)
        elif args.action == "fit":
            fit.run(cfg, run)
        else:
            plan.run(cfg, run, minutes=args.minutes, flops=args.flops)


def dispatch(args, extra) -> None:
    verb = args.verb
    if verb in STAGE_VERBS:
        if verb == "speedrun" and args.out is None:
            args.out = f"runs/{args.preset or 'cpu'}"
        cfg, run = resolve_config(args, extra)
        if verb == "pretrain" and args.minutes is not None:
            cfg.pretrain.minutes = args.minutes
        if verb == "rl" and args.algo:
            cfg.rl.algo = args.algo
        if (verb == "scaling" and args.action != "sweep") or (verb, getattr(args, "action", None)) == ("tokenizer", "report"):
            # fit, plan and the tokenizer report only read the run
            run_stage(verb, args, cfg, run)
        else:
            with recorded_config(cfg, run, speedrun=verb == "speedrun"):
                run_stage(verb, args, cfg, run)
    elif verb == "plan-memory":
        plan_memory(args)
    elif verb == "consolidate":
        from llmforge.train.checkpoint import consolidate
        print(f"wrote {consolidate(args.checkpoint)}")
    elif verb == "generate":
        generate(args)
    elif verb == "chat":
        from llmforge.serve.chat_cli import chat_cli
        chat_cli(args.model, inference=_load_for_inference(args), speculate=args.speculate, compile=args.compile,
                 temperature=args.temperature, top_p=args.top_p)
    elif verb == "serve":
        from llmforge.serve.api import serve
        if args.dtype is not None:
            from llmforge.infer.quantize import check_dtype
            check_dtype(args.dtype)
        if args.speculate is not None and args.speculate < 0:
            raise UserError(f"--speculate must be >= 0, got {args.speculate}")
        serve(args.model, host=args.host, port=args.port, db=args.db, index=args.index, api_keys=args.api_key,
              dtype=args.dtype, speculate=args.speculate, compile=args.compile)
    elif verb == "export":
        from llmforge.interop import export_checkpoint
        export_checkpoint(args.model, args.format, args.out, dtype=args.dtype)
    elif verb == "import":
        from llmforge.interop import import_hf
        import_hf(args.hf_dir, args.out)
    elif verb == "index":
        from llmforge.infer.rag import index_add
        index_add(args.paths, args.db, model=args.model)
    elif verb == "feedback":
        from llmforge.serve.feedback import export_cli
        export_cli(args.db, args.out, users=args.user, max_per_user=args.max_per_user)


def plan_memory(args) -> None:
    import dataclasses

    import torch

    from llmforge.train.memory import parse_bytes, plan_memory as plan, report
    cfg = config_mod.resolve(args.preset, args.config, args.set)
    tc = getattr(cfg, args.stage)
    parallel = args.parallel or tc.parallel
    gpu = parse_bytes(args.gpu_memory) if args.gpu_memory else None
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    for ac in (False, True):
        result = plan(cfg.model, dataclasses.replace(tc, activation_checkpointing=ac), parallel, args.world, dtype)
        print(report(result, gpu, f"{args.preset} {args.stage}, {parallel} on {args.world} rank(s), micro-batch "
                                  f"{tc.batch_size} x {tc.seq_len}, {args.dtype}, activation checkpointing "
                                  f"{'on' if ac else 'off'}:"))


def _inference_args(p, default="fp32") -> None:
    """--dtype / --speculate / --compile of the engine (serve: None = the run's serve config)."""
    g = p.add_argument_group("inference")
    g.add_argument("--dtype", default=default, help="weights: fp32 | bf16 | int8 (weight-only, per channel)")
    g.add_argument("--speculate", type=int, default=None if default is None else 0, metavar="N",
                   help="prompt-lookup speculative decoding, N draft tokens per step (0 = off)")
    g.add_argument("--compile", action="store_true", default=None if default is None else False,
                   help="torch.compile the decode step: ~1.8x tokens/s at batch 1 on a CPU, seconds to compile "
                        "per batch size (infer/compiled.py)")


def _load_for_inference(args):
    """The policy, its config and folder, in the precision --dtype asks for."""
    from llmforge.infer.quantize import check_dtype, for_inference
    from llmforge.train.checkpoint import load_model

    check_dtype(args.dtype)
    if args.speculate < 0:
        raise UserError(f"--speculate must be >= 0, got {args.speculate}")
    model, config, folder = load_model(args.model)
    return for_inference(model, args.dtype), config, folder


def generate(args) -> None:
    import torch

    from llmforge.infer.engine import Engine
    from llmforge.infer.sampling import SamplingParams
    from llmforge.train.checkpoint import load_tokenizer

    model, config, folder = _load_for_inference(args)
    tok = load_tokenizer(folder)
    if args.chat:
        from llmforge.tokenizer.chat import render_prompt
        prompt = render_prompt(tok, [{"role": "user", "content": args.prompt}])
        stops = [tok.token_id("<|end|>"), tok.eot_id]
        prefix = ""
    else:
        prompt, stops, prefix = [tok.eot_id] + tok.encode(args.prompt), [tok.eot_id], args.prompt
    if args.max_tokens <= 0:
        raise UserError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=None if args.seed is None else args.seed + i,
                             stop_token_ids=stops) for i in range(args.num_samples)]
    try:
        engine = Engine(model, tok, max_batch=max(1, args.num_samples), speculate=args.speculate, compile=args.compile)
        outs = engine.generate([prompt] * args.num_samples, params)
    except ValueError as e:
        raise UserError(f"{e}; shorten the prompt") from None
    for i, out in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ({out.finish_reason})")
        print(prefix + out.text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.verb not in STAGE_VERBS:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        dispatch(args, extra)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished checkpoints are kept (continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``safety-jax`` command line: one subcommand per job.

    safety-jax convert --src HF_FOLDER --dst OUT --to orbax       # or --to hf, from an orbax folder
    safety-jax generate --model FOLDER --prompt "..." --max-new-tokens 32 [--temperature 0.7 --top-p 0.9]
    safety-jax train --config run.yaml key=value ...               # SFT / DPO / unlearning
"""

from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> None:
    from safety_jax.model.io import load_model, load_tokenizer, model_format, save_model

    config, params = load_model(args.src, dtype=args.dtype)
    try:
        tokenizer = load_tokenizer(args.src)
    except ValueError:
        tokenizer = None
    save_model(args.dst, config, params, fmt=args.to, tokenizer=tokenizer)
    print(f"converted {args.src} ({model_format(args.src)}) -> {args.dst} ({args.to})")


def _generate(args: argparse.Namespace) -> None:
    import jax

    from safety_jax.model.generate import generate_text
    from safety_jax.model.io import load_model, load_tokenizer

    config, params = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    prompts = list(args.prompt)
    if args.chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    texts = generate_text(params, config, tokenizer, prompts, rng=jax.random.key(args.seed),
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k)
    for prompt, text in zip(args.prompt, texts):
        print(f"### {prompt}\n{text}")


def _train(args: argparse.Namespace) -> None:
    from safety_jax.train.run import train_from_cli

    train_from_cli(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safety-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a model folder between Hugging Face and orbax formats")
    p.add_argument("--src", required=True, help="Hugging Face or orbax model folder")
    p.add_argument("--dst", required=True, help="output folder")
    p.add_argument("--to", choices=["hf", "orbax"], required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.set_defaults(func=_convert)

    p = sub.add_parser("generate", help="generate text from a model folder with its tokenizer")
    p.add_argument("--model", required=True, help="Hugging Face or orbax model folder (with tokenizer files)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.set_defaults(func=_generate)

    p = sub.add_parser("train", help="SFT / DPO / unlearning from a YAML config")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 steps=100")
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])

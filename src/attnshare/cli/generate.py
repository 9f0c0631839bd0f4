"""attnshare generate: stream text from a base model or an artifact."""

from __future__ import annotations


def add_parser(sub, name: str) -> None:
    from .common import add_model_args

    p = sub.add_parser(name, help="generate text (streams tokens as they are produced)",
                       epilog="example: attnshare generate --model out/sa --prompt 'To be, or not to be'")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-p 0.95) instead of greedy")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--compile", action="store_true",
                   help="static cache and a torch.compile'd decode step (one graph; the first step compiles)")
    p.add_argument("--no-autotune", dest="autotune", action="store_false",
                   help="with --compile on CPU, keep inductor's defaults instead of freezing the weights and "
                        "autotuning every GEMM (a shorter first compile, slower steps)")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from ..errors import AttnshareError
    from ..hf_compat import compiled_generation
    from ..sharing.apply import fast_path_compiling, use_fast_path
    from .common import load_from_args

    if args.max_new_tokens < 1:
        raise AttnshareError("--max-new-tokens must be at least 1.")
    if not args.prompt.strip():
        raise AttnshareError("The prompt is empty; give some text with --prompt.")
    model, tokenizer = load_from_args(args)
    if args.chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] + args.max_new_tokens > limit:
        raise AttnshareError(f"Prompt plus new tokens exceed the model's context of {limit}; shorten them.")
    streamer = TextStreamer(tokenizer, skip_prompt=not args.chat)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.95} if args.sample else {"do_sample": False}
    fast = {}
    if args.compile:
        fast = compiled_generation()
        use_fast_path(model)  # HF's SDPA would copy the static cache's K/V per query head at every compiled step
    # without --compile nothing compiles, and fast_path_compiling without autotune changes no setting
    with torch.no_grad(), fast_path_compiling(model.device, args.compile and args.autotune):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                       streamer=streamer, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling,
                       **fast)
    return 0

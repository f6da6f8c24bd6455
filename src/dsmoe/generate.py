"""`dsmoe generate --checkpoint DIR --prompt TEXT`: sample from a trained model (KV cache, top-k / top-p)."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint or run directory")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-tokens", type=int, default=200, help="new tokens to sample (capped by max_seq_len)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 disables)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def generate_text(model, tokenizer, prompt: str, max_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = None, top_p: float | None = 0.95, seed: int = 0, device: str = "cpu") -> str:
    """The prompt's continuation (without the prompt)."""
    import torch

    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty: give at least one character to continue")
    if len(ids) >= model.cfg.max_seq_len:
        ids = ids[-(model.cfg.max_seq_len - 1):]  # keep the end: the model sees at most max_seq_len tokens
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], device=device)
    out = model.generate(idx, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return tokenizer.decode(out[0, len(ids):].tolist())


def run(args) -> int:
    from dsmoe.checkpoint import CheckpointError
    from dsmoe.train import load_checkpoint

    if args.max_tokens <= 0 or args.temperature < 0 or not (args.top_p is None or 0 < args.top_p <= 1):
        print("dsmoe generate: error: need --max-tokens > 0, --temperature >= 0 and 0 < --top-p <= 1")
        return 1
    try:
        model, _, _, tokenizer = load_checkpoint(args.checkpoint, args.device)
        text = generate_text(model, tokenizer, args.prompt, args.max_tokens, args.temperature, args.top_k,
                             args.top_p, args.seed, args.device)
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"dsmoe generate: error: {e}")
        return 1
    print(args.prompt + text)
    return 0

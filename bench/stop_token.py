"""Does a chat checkpoint end its turn when it samples? For each task: the probability of
<|assistant_end|> right after the gold answer (teacher-forced), and how many sampled completions
stop before the token limit, with their mean length.

    python -m bench.stop_token out/sft
    python -m bench.stop_token out/sft --tasks stoney_mc,gsm8k_mc --items 8 --samples 4

Greedy accuracy can look fine while sampling never stops (the stop token top-1 of a flat
distribution); GRPO and pass@k sample, so this is the check to run before RL.
"""

import torch

from nanostoney import checkpoint, cli
from nanostoney.cli import run_main
from nanostoney.engine import Engine
from nanostoney.errors import UserError
from nanostoney.tasks import get_task
from nanostoney.tasks.subset import subset


@torch.no_grad()
def stop_stats(model, tok, task, items, samples, max_new_tokens, temperature, seed=0):
    end = tok.token_id("<|assistant_end|>")
    exs = subset(task, "val", items)
    p_end = []
    for ex in exs:
        ids, _ = tok.render_conversation(ex)  # ends with <|assistant_end|>
        logits = model(torch.tensor([ids[:-1]], device=model.get_device()))[0, -1].float()
        p_end.append(torch.softmax(logits, -1)[end].item())
    prompts = [tok.render_prompt({"messages": task.prompt(ex)}) for ex in exs]
    gen = Engine(model, tok).generate(prompts, max_new_tokens, temperature=temperature, seed=seed,
                                      num_samples=samples)
    return {"p_end": sum(p_end) / len(p_end), "stopped": sum(gen.stopped), "rows": len(gen.stopped),
            "mean_len": sum(len(t) for t in gen.tokens) / len(gen.tokens)}


def main():
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--tasks", default="stoney_mc,gsm8k_mc")
    p.add_argument("--items", type=cli.positive_int, default=8, help="val items per task")
    p.add_argument("--samples", type=cli.positive_int, default=4, help="samples per item")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=128)
    p.add_argument("--temperature", type=cli.positive_float, default=1.0)
    args = p.parse_args()
    model, tok, _ = checkpoint.load_model(args.checkpoint)
    if tok is None:
        raise UserError(f"{args.checkpoint} has no tokenizer; point at a checkpoint saved with one.")
    print(f"{args.checkpoint}: T={args.temperature}, {args.samples} samples of up to {args.max_new_tokens} tokens")
    print("| task | P(<|assistant_end|> after the gold answer) | samples that stop | mean length |")
    print("|---|---|---|---|")
    for name in args.tasks.split(","):
        s = stop_stats(model, tok, get_task(name.strip()), args.items, args.samples, args.max_new_tokens,
                       args.temperature)
        print(f"| {name} | {s['p_end']:.3f} | {s['stopped']}/{s['rows']} | {s['mean_len']:.0f} |")


if __name__ == "__main__":
    run_main(main)

#!/usr/bin/env python3
"""Generate text from an exported Hugging Face model with ``transformers`` (the demo's last step).

    python tools/generate_hf.py HF_DIR [--prompt TEXT ...] [--max-new-tokens 40] [--seed 0]

Loads ``LlamaForCausalLM`` and the tokenizer the export wrote, samples a continuation for each
prompt (top-k 40, temperature 0.8; ``--greedy`` for argmax) and prints it. CPU, fp32.
"""

import argparse
import os
import sys

DEFAULT_PROMPTS = ["The history of the city", "In the early years of the century,", "He said that the"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--prompt", action="append", help="repeatable; default: three demo prompts")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        p.error(f"{args.model_dir}: no config.json; give a directory written by prores-megatron-convert-to-hf")
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = LlamaForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32).eval()
    for prompt in args.prompt or DEFAULT_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, top_k=40,
                temperature=0.8, pad_token_id=tokenizer.eos_token_id,
            )
        text = tokenizer.decode(out[0], skip_special_tokens=True)
        print(f"--- {prompt!r}\n{text}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

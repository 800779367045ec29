"""Prompt files for `-m megatron_longvita.generate`, and the decoded answer it wrote.

    python tools/build_prompt.py encode --load CKPT --tokenizer DIR --image cat.png \
        --question "What is in the image?" --out-dir prompt/        # ids.json + pv.npy
    python tools/build_prompt.py decode --tokenizer DIR --generated out.json
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from megatron_longvita.checkpoint.convert import load_model_config
from megatron_longvita.data import ChatTokenizer, MediaConfig, build_inference_prompt


def encode(args: argparse.Namespace) -> None:
    model, _ = load_model_config(args.load)
    tokenizer = ChatTokenizer.from_dir(args.tokenizer)
    content = "".join("<image>\n" for _ in args.image) + args.question
    prompt = build_inference_prompt([{"role": "user", "content": content}], tokenizer,
                                    MediaConfig.from_model_config(model, max_tiles=args.max_tiles), images=args.image)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "ids.json"), "w") as handle:
        json.dump(prompt.tokens[0].tolist(), handle)
    np.save(os.path.join(args.out_dir, "pv.npy"), prompt.pixel_values.numpy())
    print(json.dumps({"prompt_tokens": prompt.tokens.shape[1], "tiles": prompt.pixel_values.shape[0],
                      "eos_id": tokenizer.ids["<|im_end|>"]}))


def decode(args: argparse.Namespace) -> None:
    tokenizer = ChatTokenizer.from_dir(args.tokenizer)
    with open(args.generated) as handle:
        ids = json.load(handle)["generated_ids"]
    print(tokenizer.decode([i for i in ids if i != tokenizer.ids["<|im_end|>"]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    enc = commands.add_parser("encode")
    enc.add_argument("--load", required=True, help="checkpoint directory (its longvita_config.json)")
    enc.add_argument("--tokenizer", required=True)
    enc.add_argument("--image", action="append", default=[])
    enc.add_argument("--question", required=True)
    enc.add_argument("--max-tiles", type=int, default=12)
    enc.add_argument("--out-dir", required=True)
    dec = commands.add_parser("decode")
    dec.add_argument("--tokenizer", required=True)
    dec.add_argument("--generated", required=True, help="the --output JSON of megatron_longvita.generate")
    args = parser.parse_args()
    encode(args) if args.command == "encode" else decode(args)


if __name__ == "__main__":
    main()

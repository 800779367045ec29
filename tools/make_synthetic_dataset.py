"""Write the synthetic coloured-shapes corpus (JSONL + media + mixture + tokenizer).

python tools/make_synthetic_dataset.py --out runs/quickstart/data [--preset tiny]
"""

from __future__ import annotations

import argparse
import json

from megatron_longvita.data.synthetic import make_corpus
from megatron_longvita.models.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="tiny", help="model preset whose image_token_id and tile size to match")
    parser.add_argument("--num-images", type=int, default=240)
    parser.add_argument("--num-videos", type=int, default=8)
    args = parser.parse_args()
    model = get_preset(args.preset)
    corpus = make_corpus(args.out, model.image_token_id, model.image_size, args.num_images, args.num_videos)
    print(json.dumps({"mixture": corpus.mixture, "tokenizer": corpus.tokenizer_dir, "test_images": corpus.test_images}))


if __name__ == "__main__":
    main()

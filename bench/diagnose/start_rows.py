"""Where each detect-mode seed starts: the vocabulary tokens of its strided soft prompt.

`--prompt-init stride` (the paper's, detect mode's default) starts seed s on vocabulary rows
(70*s + 10*i) mod V, i = 0..6. This prints, per seed, those tokens and how many of them are
usable text (`auditor.hints.usable_token`: not special, not a placeholder such as [unusedN])
and how many of those are ASCII letters or digits (the pieces of Latin-script words), read from a
model folder's tokenizer. No model weights are loaded.

Run: python bench/diagnose/start_rows.py MODEL_DIR [SEEDS]
"""

from __future__ import annotations

import sys

from lmsan.auditor.hints import usable_token


def main() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    v = len(tok)
    print(f"{v} vocabulary rows; rows (70*s + 10*i) mod {v}, i = 0..6")
    special = set(tok.all_special_ids)
    print("| seed | usable | ASCII letters/digits | tokens |\n|---|---|---|---|")
    for s in range(seeds):
        ids = [(70 * s + 10 * i) % v for i in range(7)]
        texts = [usable_token(tok, i, special) for i in ids]
        latin = sum(1 for t in texts if t and t.removeprefix("##").isascii()
                    and t.removeprefix("##").isalnum())
        used = sum(1 for t in texts if t)
        print(f"| {s} | {used}/7 | {latin}/7 | {' '.join(tok.convert_ids_to_tokens(ids))} |")


if __name__ == "__main__":
    main()

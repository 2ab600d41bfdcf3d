"""compress-vocab on DeepSeek-V3 against the straightforward loop over ids, in one run.

Run: .venv/bin/python benchmarks/bench_compress_vocab.py
"""

from __future__ import annotations

import numpy as np
from engram_cli.tokenizer import load_tokenizer
from engram_cli.vocab import compress_vocab
from tokenizers import Regex, normalizers

from common import interleaved, markdown_table


def straightforward(tok) -> np.ndarray:
    norm = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), "\ue000"),
            normalizers.Strip(),
            normalizers.Replace("\ue000", " "),
        ]
    )
    seen: dict[str, int] = {}
    out = []
    for tid in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([tid], skip_special_tokens=False)
        key = tok.id_to_token(tid) if "\ufffd" in text else (norm.normalize_str(text) or text)
        out.append(seen.setdefault(key, len(seen)))
    return np.array(out)


def main() -> None:
    source = load_tokenizer(None)
    assert np.array_equal(straightforward(source.tokenizer), compress_vocab(source).lookup)
    medians = interleaved(
        {
            "straightforward loop": lambda: straightforward(source.tokenizer),
            "engram compress_vocab": lambda: compress_vocab(source),
        },
        repeats=5,
    )
    base = medians["straightforward loop"]
    rows = [[name, f"{t:.2f}", f"{base / t:.2f}x"] for name, t in medians.items()]
    print(markdown_table(["DeepSeek-V3 (128,815 ids)", "median s", "speed vs loop"], rows))


if __name__ == "__main__":
    main()

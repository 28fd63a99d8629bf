"""Shared start-up of the atheris harnesses: seed the corpus and write a dictionary, so
that a short, bounded run already reaches past the first syntax checks."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

import atheris


def run(test_one_input: Callable[[bytes], None], seeds: Sequence[bytes],
        tokens: Sequence[bytes]) -> None:
    """atheris.Fuzz() with libFuzzer's arguments from sys.argv; an empty corpus directory
    given there gets `seeds`, and `tokens` become a -dict= file beside it."""
    argv = list(sys.argv)
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if corpus and os.path.isdir(corpus[0]) and not os.listdir(corpus[0]):
        for i, seed in enumerate(seeds):
            with open(os.path.join(corpus[0], f"seed-{i}"), "wb") as f:
                f.write(seed)
        dict_path = os.path.join(os.path.dirname(os.path.abspath(corpus[0])), "tokens.dict")
        with open(dict_path, "w") as f:
            for token in tokens:
                f.write('"' + "".join(f"\\x{b:02x}" for b in token) + '"\n')
        argv.append(f"-dict={dict_path}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()

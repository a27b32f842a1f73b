"""Small local files with the schemas of the seed workloads' Hub datasets (no network).

The same columns and feature types as ``uoft-cs/cifar10``, ``nelorth/oxford-flowers``
and ``stanfordnlp/imdb``, in the Hub's parquet layout, with random pixels and
made-up reviews; and a tiny BERT written with ``save_pretrained``. Used by the
tests and by benchmarks/task_rounds.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ("good", "great", "fine", "moving", "bad", "awful", "dull", "boring", "the", "film", "was", "plot", "acting")


def _write(directory: Path, features, rows_by_split: dict[str, dict[str, list]]) -> Path:
    import datasets

    directory.mkdir(parents=True, exist_ok=True)
    for split, columns in rows_by_split.items():
        datasets.Dataset.from_dict(columns, features=features).to_parquet(
            str(directory / f"{split}-00000-of-00001.parquet"))
    return directory


def _images(rng: np.random.Generator, count: int, shape: tuple[int, int]) -> list:
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)) for _ in range(count)]


def cifar10(directory: Path, train: int = 64, test: int = 32) -> Path:
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    return _write(directory, features, {
        split: {"img": _images(rng, size, (32, 32)), "label": [i % 10 for i in range(size)]}
        for split, size in (("train", train), ("test", test))
    })


def flowers(directory: Path, train: int = 40, test: int = 8) -> Path:
    """Oxford Flowers-102's schema: "image" (photos of varied sizes) and a 102-class "label"."""
    import datasets

    rng = np.random.default_rng(1)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=102)})
    return _write(directory, features, {
        split: {"image": _images(rng, size, (int(rng.integers(200, 300)), int(rng.integers(200, 300)))),
                "label": [int(label) for label in rng.integers(0, 102, size)]}
        for split, size in (("train", train), ("test", test))
    })


def imdb(directory: Path, train: int = 48, test: int = 16) -> Path:
    """IMDB's schema: "text" and a 2-class "label" (neg, pos); plus the unlabelled split the Hub has."""
    import datasets

    rng = np.random.default_rng(2)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})

    def reviews(count: int) -> dict[str, list]:
        texts = [" ".join(rng.choice(WORDS, int(rng.integers(5, 40)))) for _ in range(count)]
        return {"text": texts, "label": [i % 2 for i in range(count)]}

    return _write(directory, features, {"train": reviews(train), "test": reviews(test), "unsupervised": reviews(8)})


def tiny_bert(directory: Path) -> Path:
    """A BERT of prajjwal1/bert-tiny's kind but smaller, random weights, with its tokenizer, as save_pretrained
    writes them."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(directory))
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(str(directory))
    return directory

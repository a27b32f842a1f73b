"""A tiny BERT sentiment classifier on IMDB (needs the `text` extra: transformers).

As Flower's quickstart-huggingface: ``prajjwal1/bert-tiny`` (4.4 M parameters,
all of which train and travel) with a 2-class head, on ``stanfordnlp/imdb``
through flwr-datasets. The `model` option takes a Hub name or a local
directory written by ``save_pretrained`` (model and tokenizer), for machines
without network.
"""

from __future__ import annotations

import importlib.util
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedgpu.tasks.hub import HubDatasetTask, hub_cached, hub_unreachable

if TYPE_CHECKING:
    import datasets
    import torch
    from torch.utils.data import DataLoader

DEFAULT_MODEL = "prajjwal1/bert-tiny"
NEEDS_EXTRA = "task text-imdb needs transformers: pip install -e '.[text]' (./run.sh installs it for this task)"


def _classifier_class() -> type:
    import torch

    class SequenceClassifier(torch.nn.Module):
        """A Hugging Face classifier that takes a tokenized batch and returns logits."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: Any) -> torch.Tensor:
            return self.model(**batch).logits

    return SequenceClassifier


class TextImdbTask(HubDatasetTask):
    name = "text-imdb"
    hub_dataset = "stanfordnlp/imdb"
    default_local_epochs = 1
    default_lr = 0.01
    preload_modules = ("datasets", "flwr_datasets", "transformers", "transformers.models.bert.modeling_bert")

    @classmethod
    def data_problem(cls, options: dict[str, Any]) -> str | None:
        if importlib.util.find_spec("transformers") is None:
            return NEEDS_EXTRA
        problem = super().data_problem(options)
        if problem:
            return problem
        model = str(options.get("model") or DEFAULT_MODEL)
        if Path(model).is_dir() or hub_cached(model, kind="models"):
            return None
        if model.startswith((".", "/")):
            return f"task text-imdb: model directory {model} not found"
        why = hub_unreachable()
        if why:
            return (f"task text-imdb downloads the model {model} from the Hugging Face Hub, which is unreachable "
                    f"({why}); give --task-option model=DIR (a save_pretrained directory)")
        return None

    def __init__(self, *, model: str = DEFAULT_MODEL, max_length: int | str = 128, **options: Any) -> None:
        super().__init__(**options)
        self.model_name = model
        self.max_length = int(max_length)
        if self.max_length < 8:
            raise ValueError(f"task {self.name}: max_length must be >= 8, got {max_length!r}")

    def warm_up(self) -> None:
        # Imports only: the model's weights may need a download, which a zygote must not do.
        if importlib.util.find_spec("transformers") is None:
            raise RuntimeError(NEEDS_EXTRA)
        for module in self.preload_modules:
            importlib.import_module(module)

    def build_model(self) -> torch.nn.Module:
        import torch

        try:
            from transformers import AutoModelForSequenceClassification
        except ImportError:
            raise RuntimeError(NEEDS_EXTRA) from None
        torch.manual_seed(self.seed)  # the same new classifier head everywhere
        model = AutoModelForSequenceClassification.from_pretrained(self.model_name, num_labels=2)
        return _classifier_class()(model)

    @cached_property
    def _tokenizer(self) -> Any:
        """Read once per task instance: the train and test loaders share it."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_name)

    def _loader(self, dataset: datasets.Dataset, *, shuffle: bool) -> DataLoader:
        import torch
        from torch.utils.data import DataLoader
        tokenizer = self._tokenizer

        def collate(rows: list[dict[str, Any]]) -> tuple[Any, torch.Tensor]:
            # A BatchEncoding: .to(device) moves every tensor, as the default train loop expects.
            batch = tokenizer([row["text"] for row in rows], truncation=True, max_length=self.max_length,
                              padding=True, return_tensors="pt")
            return batch, torch.tensor([row["label"] for row in rows], dtype=torch.long)

        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)

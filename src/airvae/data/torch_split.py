"""One split of a [`Dataset`][airvae.data.Dataset] as a ``torch.utils.data.Dataset``, for a researcher's own
training or evaluation loop (``DataLoader(TorchSplit(dataset, "train"), batch_size=100, shuffle=True)``)."""
from __future__ import annotations

import torch

from .dataset import Dataset, DatasetError


class TorchSplit(torch.utils.data.Dataset[torch.Tensor]):
    """The examples of one split as float tensors, exactly the values airvae's models see: 0/1 for
    binary data, grey levels on ``i / (levels - 1)``, real values as stored.

    ``image``: each example shaped ``(C, H, W)`` (True; the default when the dataset holds images) or
    as a flat row of ``dataset.dim`` values (False). The whole split is converted once, to ``dtype``
    on ``device`` (a copy: writing to it never changes the Dataset); ``tensor`` holds it, examples
    along the first axis. Items are tensors only (the datasets have no labels). Keep ``num_workers=0``
    in a DataLoader over a CUDA ``device``."""

    def __init__(self, dataset: Dataset, split: str = "train", *, device: torch.device | str = "cpu",
                 image: bool | None = None, dtype: torch.dtype = torch.float32) -> None:
        rows = dataset.split(split)  # a DatasetError naming the splits for an unknown one
        if image is None:
            image = dataset.image_shape is not None
        if image and dataset.image_shape is None:
            raise DatasetError(f"{dataset.name} holds flat vectors (no image_shape): pass image=False, or give "
                               "the .npz its arrays as (N, C, H, W) images")
        shape = (len(rows), *dataset.image_shape) if image and dataset.image_shape is not None else rows.shape
        # torch.tensor copies: the view never shares memory with the (immutable by intent) Dataset
        self.tensor = torch.tensor(rows, dtype=dtype, device=device).reshape(shape)
        self.name, self.split = dataset.name, split

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, index: int | slice | list[int] | torch.Tensor) -> torch.Tensor:
        return self.tensor[index]

    def __repr__(self) -> str:
        return (f"TorchSplit({self.name!r}, {self.split!r}: {len(self)} examples of shape "
                f"{tuple(self.tensor.shape[1:])}, {self.tensor.dtype} on {self.tensor.device})")

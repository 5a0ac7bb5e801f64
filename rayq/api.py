"""`rayq.save` and `rayq.load`: a compression result to and from storage."""

from __future__ import annotations

from torch import nn

from rayq.engine.compress import CompressResult
from rayq.storage.location import Location
from rayq.storage.run import load_run_model, open_run, write_run


def save(result: CompressResult, location: str, overwrite: bool = False,
         source: dict | None = None) -> Location:
    """Write a result's model, tables, pictures, summary and manifest to a location.

    The location is a local folder, a file:// URI or an s3:// URI.

    `source` records where the float model comes from (see `rayq.sources.models`), so that
    `rayq.load(location)` can rebuild it; without it, load needs the float model.
    """
    config = result.settings.model_dump(mode="json")
    return write_run(result, location, config=config, source=source, overwrite=overwrite)


def load(location: str, model: nn.Module | None = None, trust_code: bool = False) -> nn.Module:
    """Return the compressed module of a finished run, after verifying its checksums.

    Give `model`, a float instance of the same architecture, for a model that was handed over in
    memory. A run whose source is a Python factory is imported only with `trust_code=True`.
    """
    run = open_run(location)
    return load_run_model(run, model, trust_code=trust_code)

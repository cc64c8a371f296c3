"""The model's feed: window batches tokenised in a thread ahead of the model, moved to the
device from pinned memory, run through the model (stopped after the hook's layer) and the
SAE, and written into the index as sparse codes."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from saetui.collect.evaluate import EncodedWindows, encode_windows
from saetui.collect.inputs import LoadedRun


def prefetch(batches: Iterator[Any], stop: threading.Event, depth: int = 2) -> Iterator[Any]:
    """Run ``batches`` (tokenisation) in a thread, ``depth`` batches ahead."""
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slots.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as error:  # re-raised in the consumer
            failure.append(error)
        finally:
            while True:
                try:
                    slots.put(done, timeout=0.1)
                    break
                except queue.Full:
                    if stop.is_set():
                        break

    thread = threading.Thread(target=produce, name="saetui-tokenise", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                break
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()
        thread.join()


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``: from pinned memory without waiting on CUDA."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def encode_windows_of(run: LoadedRun, batch: Any) -> EncodedWindows:
    """A window batch through the model (stopped after the hook's layer) and the SAE; the
    tokens go to the device from pinned memory, asynchronously, on CUDA."""
    tokens = to_device(batch.tokens, torch.device(run.model.device))
    activations = run.model.activations(tokens, run.hook)
    return encode_windows(run.sae, activations, batch)


def encode_batch(run: LoadedRun, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse codes of a window batch's real tokens (padding dropped, windows concatenated):
    feature ids [n_tokens, K] int32, values [n_tokens, K], and the counted-token mask."""
    encoded = encode_windows_of(run, batch)
    return encoded.ids, encoded.values, encoded.counted


@torch.no_grad()
def write_encoded(writer: Any, batch: Any, encoded: EncodedWindows) -> None:
    """One batch of windows into the index: tokens, document segments and sparse codes."""
    writer.add_windows(
        batch.window_ids,
        batch.tokens,
        [
            [(s.doc_id, s.doc_offset, s.start, s.length) for s in window]
            for window in batch.segments
        ],
        encoded.ids,
        encoded.values,
        mask=encoded.counted,
        lengths=batch.lengths,
    )

"""LoRA adapters for requests (vLLM's ``LoRARequest``) and the engine's side of serving them: which adapter sits in
which of the ``max_loras`` device slots, and the adapters read from disk, kept on the host (``max_cpu_loras``).

A step's requests use at most ``max_loras`` adapters (the scheduler admits no more: ``Scheduler(max_loras=...)``);
before the step is dispatched, ``LoRASlots.slots_for`` gives each of them a slot, loading those not in one into
the slots least recently used by earlier steps (``ModelRunner.set_lora``). The weights and their reading are
``models.lora``'s (imported when an engine makes its slots: ``LoRARequest`` imports no JAX, for the server's
process).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter, OrderedDict
from typing import Callable, Optional


# A PEFT adapter folder's files (models.lora reads them): its config, and its weights as safetensors or, from older
# trainers, a PyTorch .bin (read where PyTorch is installed, as vLLM reads it).
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_folder_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a LoRA adapter folder (missing, or without a PEFT adapter's two files), or None: checked
    before the engine reads an adapter (``models.lora.read_adapter`` checks the rest) and by the server's process."""
    if not os.path.isdir(path):
        return (f"LoRA adapter folder {path!r} does not exist (adapters are read from local folders, never "
                "downloaded)")
    for files in ((ADAPTER_CONFIG_FILE,), ADAPTER_WEIGHT_FILES):
        if not any(os.path.exists(os.path.join(path, file)) for file in files):
            try:
                holds = sorted(os.listdir(path))
            except OSError as e:
                holds = e.strerror or str(e)
            return f"{path!r} is not a PEFT LoRA adapter: it has no {' or '.join(files)} (it holds {holds})"
    return None


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """A request's adapter, as vLLM names it: ``lora_name`` (what the server's ``model`` field gives),
    ``lora_int_id`` (>= 1, unique to the adapter: the engine keys its slots and cache by it) and ``lora_path``
    (a local PEFT adapter folder: ``adapter_config.json`` and ``adapter_model.safetensors`` or ``.bin``)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if isinstance(self.lora_path, os.PathLike):  # a pathlib.Path, as a string
            object.__setattr__(self, "lora_path", os.fspath(self.lora_path))
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"LoRARequest.lora_path must name a local adapter folder, got {self.lora_path!r}")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path


class LoRASlots:
    """The adapters the engine knows (by ``lora_int_id``), their weights on the host (the ``max_cpu_loras`` most
    recently used, and always those of unfinished requests: ``acquire`` / ``release``, so a step never reads an
    adapter's folder again), and which of the ``max_loras`` device slots holds which. ``load(slot, adapter)`` puts
    an adapter's weights into a slot (``ModelRunner.set_lora``)."""

    def __init__(self, config, max_loras: int, max_rank: int, max_cpu_loras: int, load: Callable[[int, dict], None]):
        self.config, self.max_loras, self.max_rank, self.max_cpu_loras = config, max_loras, max_rank, max_cpu_loras
        self._load = load
        self._requests: dict[int, LoRARequest] = {}  # every adapter seen, by id
        self._host: OrderedDict[int, dict] = OrderedDict()  # id -> weights, least recently used first
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # id -> its device slot, least recently used first
        self._users: Counter[int] = Counter()  # unfinished requests of each adapter: its weights stay on the host
        self.num_loads = 0  # adapters put into slots

    def check(self, request: LoRARequest) -> None:
        """Read (or find) the adapter, raising ``LoRAAdapterError`` for a bad one, before its request is queued.
        One id names one adapter: another path under a known id is refused."""
        from models.lora import LoRAAdapterError

        known = self._requests.get(request.lora_int_id)
        if known is not None and os.path.realpath(known.lora_path) != os.path.realpath(request.lora_path):
            raise LoRAAdapterError(f"lora_int_id {request.lora_int_id} already names adapter {known.lora_name!r} at "
                                   f"{known.lora_path!r}, not {request.lora_path!r}: give each adapter its own id")
        self._weights(request)
        self._requests[request.lora_int_id] = request

    def _weights(self, request: LoRARequest) -> dict:
        weights = self._host.get(request.lora_int_id)
        if weights is None:
            from models.lora import LoRAAdapterError, read_adapter

            problem = adapter_folder_problem(request.lora_path)
            if problem is not None:
                raise LoRAAdapterError(problem)
            weights = read_adapter(request.lora_path, self.config, self.max_rank)
            self._host[request.lora_int_id] = weights
        self._host.move_to_end(request.lora_int_id)
        unused = [i for i in self._host if i not in self._users and i != request.lora_int_id]
        for lora_id in unused[:max(len(self._host) - self.max_cpu_loras, 0)]:  # least recently used first
            del self._host[lora_id]
        return weights

    def acquire(self, lora_id: int) -> None:
        """A request of adapter ``lora_id`` was queued (``check``ed): its weights stay on the host until
        ``release``."""
        self._users[lora_id] += 1

    def release(self, lora_id: int) -> None:
        """A request of adapter ``lora_id`` ended (finished or aborted)."""
        self._users[lora_id] -= 1
        if self._users[lora_id] <= 0:
            del self._users[lora_id]

    def slots_for(self, lora_ids: set[int]) -> dict[int, int]:
        """A slot for each adapter of a step (at most ``max_loras``; each ``check``ed before), loading those not in
        one into the free slots, then into those least recently used by earlier steps."""
        if len(lora_ids) > self.max_loras:
            raise RuntimeError(f"a step uses {len(lora_ids)} LoRA adapters, more than max_loras={self.max_loras}")
        for lora_id in lora_ids:
            if lora_id in self._slot_of:
                self._slot_of.move_to_end(lora_id)
        for lora_id in lora_ids - self._slot_of.keys():
            if len(self._slot_of) < self.max_loras:
                slot = len(self._slot_of) + 1
            else:
                victim = next(i for i in self._slot_of if i not in lora_ids)
                slot = self._slot_of.pop(victim)
            self._load(slot, self._weights(self._requests[lora_id]))
            self._slot_of[lora_id] = slot
            self.num_loads += 1
        return {lora_id: self._slot_of[lora_id] for lora_id in lora_ids}

    def usage(self, scheduler) -> dict:
        """vLLM's LoRA gauge: ``max_lora`` and the names of the adapters of running and of waiting requests."""
        def names(requests) -> list[str]:
            return sorted({self._requests[r.lora_id].lora_name for r in requests if r.lora_id})

        return {"max_lora": self.max_loras, "running": names(scheduler.running_requests),
                "waiting": names(scheduler.waiting_requests)}

    def adapters(self) -> list[LoRARequest]:
        """The adapters seen so far, by id."""
        return [self._requests[i] for i in sorted(self._requests)]

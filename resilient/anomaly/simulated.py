"""SimulatedNvml: the subset of the pynvml API the collector uses, over settable fake GPUs.

Contract: same function names, constants, return shapes and errors as pynvml (errors are pynvml's
own NVMLError subclasses), so `GpuCollector(SimulatedNvml(n))` exercises the real collector code.
Tests and chaos faults change readings with `set()` (counters too: `pcie_replay`, `retired_sbe`
and `retired_dbe` pages, `retired_pending`), queue XIDs with `xid()`, and lose a GPU with
`lose()` (every call on it then raises NVMLError_GpuIsLost). Handles are opaque objects, and an
event carries a new one for its device, as pynvml's ctypes pointers do: code that compares handles
instead of asking `nvmlDeviceGetIndex` fails here as it would on a real GPU.
"""

from __future__ import annotations

import threading
from collections import deque
from types import SimpleNamespace

import pynvml


class _Handle:
    """An opaque device handle: equal only to itself, like a fresh ctypes pointer."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class SimulatedNvml:
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    NVML_AGGREGATE_ECC = pynvml.NVML_AGGREGATE_ECC
    NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = (
        pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
    )
    NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = (
        pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
    )
    # newer nvidia-ml-py only; the real value, so both sides agree when it exists
    NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = getattr(
        pynvml, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", 230
    )
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError

    def __init__(self, count: int = 1):
        self.gpus = [
            dict(
                util=35,
                mem_used=20 << 30,
                mem_total=80 << 30,
                temp=55.0,
                power_mw=300_000,
                sm_clock=1755,
                throttle=0,
                ecc_volatile=0,
                ecc_aggregate=0,
                retired_pending=0,
                retired_sbe=0,  # pages retired for multiple single-bit errors; None: unsupported
                retired_dbe=0,  # pages retired for a double-bit error; None: unsupported
                remap_pending=False,
                remap_failed=False,
                pcie_replay=0,
                recovery_action=0,
                lost=False,
            )
            for _ in range(count)
        ]
        self._events: deque = deque()
        self._lock = threading.Lock()

    # -- what tests and chaos change -------------------------------------------------------------
    def set(self, index: int, **readings) -> None:
        with self._lock:
            self.gpus[index].update(readings)

    def xid(self, index: int, xid: int) -> None:
        with self._lock:
            self._events.append(
                SimpleNamespace(
                    device=_Handle(index),
                    eventType=self.nvmlEventTypeXidCriticalError,
                    eventData=xid,
                )
            )

    def lose(self, index: int) -> None:
        self.set(index, lost=True)

    # -- the pynvml API ---------------------------------------------------------------------
    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> _Handle:
        if not 0 <= i < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(i)

    def nvmlDeviceGetIndex(self, h: _Handle) -> int:
        return h.index

    def _g(self, h: _Handle) -> dict:
        g = self.gpus[h.index]
        if g["lost"]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return g

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self._g(h)["util"], memory=0)

    def nvmlDeviceGetMemoryInfo(self, h):
        g = self._g(h)
        return SimpleNamespace(
            used=g["mem_used"], total=g["mem_total"], free=g["mem_total"] - g["mem_used"]
        )

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._g(h)["temp"]

    def nvmlDeviceGetPowerUsage(self, h):
        return self._g(h)["power_mw"]

    def nvmlDeviceGetClockInfo(self, h, clock):
        return self._g(h)["sm_clock"]

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._g(h)["throttle"]

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        g = self._g(h)
        return g["ecc_volatile"] if counter == self.NVML_VOLATILE_ECC else g["ecc_aggregate"]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h):
        return self._g(h)["retired_pending"]

    def nvmlDeviceGetRetiredPages(self, h, cause):
        g = self._g(h)
        dbe = cause == self.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
        n = g["retired_dbe"] if dbe else g["retired_sbe"]
        if n is None:  # as on GPUs that remap rows instead of retiring pages
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        base = 0x2_0000_0000 if dbe else 0x1_0000_0000
        return [base + i * 0x1000 for i in range(n)]  # page addresses, as pynvml returns them

    def nvmlDeviceGetRemappedRows(self, h):
        g = self._g(h)
        return (0, 0, int(g["remap_pending"]), int(g["remap_failed"]))

    def nvmlDeviceGetPcieReplayCounter(self, h):
        return self._g(h)["pcie_replay"]

    def nvmlDeviceGetFieldValues(self, h, fields):
        g = self._g(h)
        return [
            SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(uiVal=g["recovery_action"]))
            for _ in fields
        ]

    def nvmlEventSetCreate(self):
        return object()

    def nvmlDeviceRegisterEvents(self, h, types, event_set) -> None:
        pass

    def nvmlEventSetWait(self, event_set, timeout_ms):
        with self._lock:
            if not self._events:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
            return self._events.popleft()

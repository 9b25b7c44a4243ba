"""Collectors: GPU metrics through NVML, host metrics through psutil, and a simulated GPU.

Contract: `GpuCollector(nvml)` reads every GPU through the pynvml API; `nvml` is the real `pynvml`
module or a `SimulatedNvml`, which implements the same functions and raises the same errors, so the
same code path runs with and without a GPU. `sample()` returns one dict per GPU; a GPU that stops
answering yields `lost=True` (a fault, not missing data); XID critical errors come from an NVML
event set, attributed to a GPU by `nvmlDeviceGetIndex` (pynvml handles are ctypes pointers: a
handle an event carries is never the same object as the one the collector holds). Fields that only
newer drivers or nvidia-ml-py have are read only where they exist. Without NVML or a GPU,
`open_gpu_collector()` says why once and returns None.
Counters (ECC, retired pages by cause, PCIe replays) are read as NVML gives them, totals since
the driver loaded; the detectors compare them between samples.
`HostCollector.sample(pids)` returns CPU, memory, disk and network counters and each worker's RSS.
"""

from __future__ import annotations

import time

import psutil
import pynvml

FIELDS = (
    "util",
    "mem_used",
    "mem_total",
    "temp",
    "power_w",
    "sm_clock",
    "throttle_reasons",
    "ecc_volatile_uncorrected",
    "ecc_aggregate_uncorrected",
    "retired_pending",
    "retired_pages_sbe",
    "retired_pages_dbe",
    "remap_pending",
    "remap_failed",
    "pcie_replay",
    "recovery_action",
)


class GpuCollector:
    def __init__(self, nvml):
        self.nvml = nvml
        nvml.nvmlInit()
        self.handles = [
            nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())
        ]
        self.events = nvml.nvmlEventSetCreate()
        for h in self.handles:
            try:
                nvml.nvmlDeviceRegisterEvents(h, nvml.nvmlEventTypeXidCriticalError, self.events)
            except pynvml.NVMLError:  # not supported here: XIDs then come from the driver log
                pass
        self.lost: set[int] = set()

    def _read(self, h, name: str, fn, *args, default=None):
        try:
            return fn(h, *args)
        except pynvml.NVMLError_GpuIsLost:
            raise
        except pynvml.NVMLError:  # not supported here: leave the field empty
            return default

    def _one(self, i: int, h) -> dict:
        n = self.nvml
        util = self._read(h, "util", n.nvmlDeviceGetUtilizationRates)
        mem = self._read(h, "mem", n.nvmlDeviceGetMemoryInfo)
        power = self._read(h, "power", n.nvmlDeviceGetPowerUsage)
        remap = self._read(h, "remap", n.nvmlDeviceGetRemappedRows)
        recovery = getattr(n, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None)  # nvidia-ml-py >= 12.570
        rec = (
            self._read(h, "recovery", n.nvmlDeviceGetFieldValues, [recovery])
            if recovery is not None
            else None
        )
        return {
            "gpu": i,
            "lost": False,
            "util": util.gpu if util else None,
            "mem_used": mem.used if mem else None,
            "mem_total": mem.total if mem else None,
            "temp": self._read(h, "temp", n.nvmlDeviceGetTemperature, n.NVML_TEMPERATURE_GPU),
            "power_w": power / 1000 if power is not None else None,
            "sm_clock": self._read(h, "clock", n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_SM),
            "throttle_reasons": self._read(h, "throttle", n.nvmlDeviceGetCurrentClocksEventReasons),
            "ecc_volatile_uncorrected": self._read(
                h,
                "ecc",
                n.nvmlDeviceGetTotalEccErrors,
                n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                n.NVML_VOLATILE_ECC,
            ),
            "ecc_aggregate_uncorrected": self._read(
                h,
                "ecc",
                n.nvmlDeviceGetTotalEccErrors,
                n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                n.NVML_AGGREGATE_ECC,
            ),
            "retired_pending": self._read(h, "retired", n.nvmlDeviceGetRetiredPagesPendingStatus),
            "retired_pages_sbe": self._retired(
                h, n.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
            ),
            "retired_pages_dbe": self._retired(
                h, n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
            ),
            "remap_pending": bool(remap[2]) if remap else None,
            "remap_failed": bool(remap[3]) if remap else None,
            "pcie_replay": self._read(h, "pcie", n.nvmlDeviceGetPcieReplayCounter),
            "recovery_action": (rec[0].value.uiVal if rec and rec[0].nvmlReturn == 0 else None),
        }

    def _retired(self, h, cause: int) -> int | None:
        """How many pages are retired (or pending retirement) for `cause`; None where the GPU has
        no page retirement (Ampere and later remap rows instead)."""
        pages = self._read(h, "retired", self.nvml.nvmlDeviceGetRetiredPages, cause)
        return len(pages) if pages is not None else None

    def xids(self) -> list[tuple[int, int]]:
        """(gpu index, xid) of every XID critical-error event since the last call."""
        out = []
        while True:
            try:
                ev = self.nvml.nvmlEventSetWait(self.events, 0)
            except pynvml.NVMLError_Timeout:
                return out
            except pynvml.NVMLError:
                return out
            try:
                idx = self.nvml.nvmlDeviceGetIndex(ev.device)
            except pynvml.NVMLError:  # the GPU went away: the XID still counts, on no GPU
                idx = -1
            out.append((idx, int(ev.eventData)))

    def sample(self) -> list[dict]:
        now = time.time()
        xids = self.xids()
        out = []
        for i, h in enumerate(self.handles):
            try:
                s = self._one(i, h)
            except pynvml.NVMLError_GpuIsLost:
                s = {"gpu": i, "lost": True, **{f: None for f in FIELDS}}
            s["t"] = now
            s["xid"] = max((x for g, x in xids if g == i), default=0)
            out.append(s)
        return out


def open_gpu_collector(mode: str, simulated=None) -> tuple[GpuCollector | None, str]:
    """The collector for `anomaly.gpu`, or None and the reason (said once, then the collector
    stays off)."""
    if mode == "off":
        return None, "anomaly.gpu = off"
    if mode == "simulated":
        return GpuCollector(simulated), "simulated GPU"
    try:
        c = GpuCollector(pynvml)
    except pynvml.NVMLError as e:
        return None, f"no NVML/GPU here ({e}); GPU metrics off"
    if not c.handles:
        return None, "NVML found no GPU; GPU metrics off"
    return c, f"NVML: {len(c.handles)} GPU(s)"


class HostCollector:
    def __init__(self):
        psutil.cpu_percent(None)  # the first call only primes the counter

    def sample(self, pids: dict[int, int]) -> dict:
        """Host counters plus the RSS of each worker; `pids` maps rank -> pid (ranks on this
        node)."""
        vm = psutil.virtual_memory()
        disk = psutil.disk_io_counters()
        net = psutil.net_io_counters()
        rss = {}
        for rank, pid in pids.items():
            try:
                rss[rank] = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return {
            "t": time.time(),
            "cpu_percent": psutil.cpu_percent(None),
            "mem_percent": vm.percent,
            "disk_read": disk.read_bytes if disk else None,
            "disk_write": disk.write_bytes if disk else None,
            "net_sent": net.bytes_sent,
            "net_recv": net.bytes_recv,
            "rss": rss,
        }

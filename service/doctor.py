"""``flowserve doctor``: what this machine offers the service, and which path each bundled model's tasks take.

Three parts, each a list of ``(name, value, note)`` rows:

* **versions**: Python, torch (and the CUDA and cuDNN it was built with), the NVIDIA driver, ONNX Runtime
  and its execution providers, Triton, and the devices;
* **capabilities**: TF32, bf16, flash and memory-efficient SDPA, CUDA graphs, the fused Triton butterfly
  kernel, ONNX Runtime's CUDA provider. Each is checked here, and the note says why it is absent;
* **models**: the repository's models loaded as the server loads them, with each task's execution
  path and the reason for it (``GET /v1/models/{name}``'s ``execution``).

It works on a machine without a GPU, where it says what is absent.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import platform
from dataclasses import dataclass

from service.settings import Settings

Row = tuple[str, str, str]


@dataclass(frozen=True)
class Report:
    versions: list[Row]
    capabilities: list[Row]
    models: list[Row]

    def text(self) -> str:
        out = []
        for title, rows in (("versions", self.versions), ("capabilities", self.capabilities), ("models", self.models)):
            out.append(f"{title}:")
            width = max((len(r[0]) for r in rows), default=0)
            out += [f"  {name.ljust(width)}  {value}" + (f"  ({note})" if note else "") for name, value, note in rows]
        return "\n".join(out)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> list[Row]:
    import torch

    rows: list[Row] = [("python", platform.python_version(), ""), ("torch", torch.__version__, "")]
    rows.append(("torch CUDA build", torch.version.cuda or "none", "" if torch.version.cuda else "a CPU build of torch"))
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rows.append(("cuDNN", str(cudnn) if cudnn else "none", ""))
    if torch.cuda.is_available():
        driver = torch._C._cuda_getDriverVersion() if hasattr(torch._C, "_cuda_getDriverVersion") else None
        rows.append(("NVIDIA driver (CUDA API)", f"{driver // 1000}.{driver % 1000 // 10}" if driver else "unknown", ""))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB", ""))
    else:
        rows.append(("devices", "cpu", "no CUDA device is visible to torch"))
    ort = _version("onnxruntime-gpu") or _version("onnxruntime")
    if ort:
        import onnxruntime

        rows.append(("onnxruntime", ort, ", ".join(onnxruntime.get_available_providers())))
    else:
        rows.append(("onnxruntime", "absent", "ONNX backends unavailable"))
    triton = _version("triton")
    rows.append(("triton", triton or "absent", "" if triton else "the fused butterfly kernel needs it"))
    return rows


def capabilities() -> list[Row]:
    """Each optional fast path, whether it is usable here, and why not."""
    import torch

    cuda = torch.cuda.is_available()
    major = torch.cuda.get_device_capability(0)[0] if cuda else 0
    no_gpu = "no CUDA device"
    rows: list[Row] = []

    def row(name: str, ok: bool, why_not: str, note: str = "") -> None:
        rows.append((name, "yes" if ok else "no", note if ok else why_not))

    row("TF32 matmul/conv", cuda and major >= 8, no_gpu if not cuda else f"sm_{major}x < sm_80")
    row("bf16", cuda and torch.cuda.is_bf16_supported(), no_gpu if not cuda else "the device does not support bf16")
    flash = cuda and major >= 8 and torch.backends.cuda.flash_sdp_enabled()
    row("flash SDPA", flash, no_gpu if not cuda else "needs sm_80+ and torch's flash kernels")
    row("memory-efficient SDPA", cuda and torch.backends.cuda.mem_efficient_sdp_enabled(), no_gpu if not cuda else "disabled in torch")
    row("CUDA graphs", cuda, no_gpu, "captured per batch size at warm-up (FLOWSERVE_CUDA_GRAPHS)")
    kernel_ok, why = False, no_gpu
    if cuda:
        from models.flows import butterfly_kernel

        kernel_ok = butterfly_kernel.triton_available()
        why = "Triton is absent or too old (needs tl.split and tl.permute)"
    row("fused Triton butterfly", kernel_ok, why)
    providers: list[str] = []
    if _version("onnxruntime-gpu") or _version("onnxruntime"):
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    row("ONNX Runtime CUDA provider", cuda and "CUDAExecutionProvider" in providers,
        no_gpu if not cuda else "onnxruntime-gpu is not installed (ORT_EXTRA=gpu)")
    row("torch.compile", True, "", "available; off unless FLOWSERVE_COMPILE=1")
    return rows


async def _load_models(settings: Settings) -> list[Row]:
    from service.executor.repository import ModelRepository
    from service.executor.workers import DeviceWorker, resolve_devices
    from service.metrics import Metrics

    workers = [DeviceWorker(d) for d in resolve_devices(settings.devices)]
    repository = ModelRepository(settings, workers, Metrics())
    rows: list[Row] = []
    try:
        await repository.reload()
        for name, entry in sorted(repository.models.items()):
            d = entry.describe()
            if entry.state != "ready":
                rows.append((f"{name} {entry.version}", entry.state, entry.reason or ""))
                continue
            where = f"{d.get('backend')} on {', '.join(d.get('devices', []))}"
            for task, how in sorted(d.get("execution", {}).items()):
                rows.append((f"{name} {entry.version} {task}", how, where))
    finally:
        await repository.close()
        for w in workers:
            w.shutdown()
    return rows


def diagnose(settings: Settings, models: bool = True) -> Report:
    """The report; ``models=False`` skips loading the repository."""
    model_rows = asyncio.run(_load_models(settings)) if models else []
    return Report(versions(), capabilities(), model_rows)

"""Backends behind one interface: a model on one device that scores and samples numpy batches.

``log_prob(x, noise) -> (B,)`` nats; ``sample(z) -> (B, *shape)`` in data space.

**Rows never depend on their batch-mates, bit for bit.** Kernels need not promise that: BLAS and
oneDNN on the CPU, cuBLAS and cuDNN on a GPU pick algorithms by problem size, so the same row can
round differently in a batch of 3 and in a batch of 16 (measured: eager torch on the CPU differs
from 16 rows up, and for convolutional models already between 1 and 2 rows; so does ONNX
Runtime's CPU ``ReduceMean`` over channels in the Flow++ graph; ONNX Runtime on the Glow and
traced graphs of convolutional models, :mod:`service.executor.traced`, do not). Within one
batch size a row's result does not depend on its position. So a task whose backend is not
batch-invariant computes every batch as **tiles** of one fixed size (``tile_rows``; the last
tile padded with copies of its last row, whose results are dropped); ``tiles`` says which tasks
do. Loading checks scoring on probe rows and falls back to tiles if a backend expected to be
invariant is not. ``FLOWSERVE_BATCH_INVARIANT=0`` turns tiles off for throughput.

**Torch on the CPU** scores through a TorchScript graph traced at load (:mod:`service.executor.traced`,
``FLOWSERVE_TRACE_CPU``); sampling runs eager.

**CUDA graphs** (torch on CUDA, ``FLOWSERVE_CUDA_GRAPHS``): at warm-up each task's forward is
captured once per batch size it will run at: the tile size, or without tiles a ladder of powers
of two up to ``max_batch_size`` (a batch is padded to the next captured size). A task that cannot
be captured (a host sync inside it) runs eager, and :attr:`Runner.execution` says so.
**ONNX Runtime on CUDA** binds inputs and outputs (IO binding) instead of copying through ``run``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from models.artifacts.store import Manifest, load, read_manifest, verify
from models.density import DensityModel
from models.errors import ArtifactError
from service.executor.ort_sessions import open_session
from service.executor.selfcheck import DeviceFault, Fallback, Quarantine, check, failed
from service.settings import Settings

log = logging.getLogger(__name__)

Arrays = tuple[np.ndarray | None, ...]


class Runner(Protocol):
    backend: str
    device: str
    manifest: Manifest
    execution: dict[str, str]  # per task: how it runs ("eager", "cuda graphs at 1,2,4…", "tiles of 64 rows")
    tiles: dict[str, int | None]  # per task: rows per tile, None = any batch size in one call

    def log_prob(self, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray: ...

    def sample(self, z: np.ndarray) -> np.ndarray: ...


def pad_rows(arrays: Arrays, rows: int) -> Arrays:
    """Each array padded to ``rows`` rows with copies of its last row (valid inputs, dropped afterwards)."""
    out = []
    for a in arrays:
        if a is None or len(a) == rows:
            out.append(a)
        else:
            out.append(np.concatenate([a, np.repeat(a[-1:], rows - len(a), axis=0)]))
    return tuple(out)


def in_tiles(fn: Callable[..., np.ndarray], arrays: Arrays, tile: int | None) -> np.ndarray:
    """``fn`` over the rows of ``arrays``, in calls of exactly ``tile`` rows (``None``: one call)."""
    n = len(arrays[0])
    if tile is None:
        return fn(*arrays)
    parts = []
    for i in range(0, n, tile):
        chunk = tuple(None if a is None else a[i : i + tile] for a in arrays)
        k = len(chunk[0])
        parts.append(fn(*pad_rows(chunk, tile))[:k])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def ladder(max_rows: int) -> list[int]:
    """Powers of two up to ``max_rows`` (and ``max_rows`` itself)."""
    sizes, b = [], 1
    while b < max_rows:
        sizes.append(b)
        b *= 2
    return [*sizes, max_rows]


class GraphedTask:
    """A torch function of fixed-shape CUDA tensors, captured as one CUDA graph per batch size.

    Inputs are copied into the graph's static tensors (padded to the captured size), the graph
    is replayed, and the first ``n`` rows of its static output are copied back.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], examples: Callable[[int], tuple[torch.Tensor | None, ...]],
                 sizes: list[int]) -> None:
        self.sizes = sorted(sizes)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        for b in sorted(sizes, reverse=True):  # the largest first: smaller graphs reuse its memory pool
            static = examples(b)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(2):
                    fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
                out = fn(*static)
            self.graphs[b] = (graph, static, out)

    def size_for(self, n: int) -> int:
        return next(b for b in self.sizes if b >= n)

    def __call__(self, *arrays: np.ndarray | None) -> np.ndarray:
        n = len(arrays[0])
        graph, static, out = self.graphs[self.size_for(n)]
        for dst, src in zip(static, pad_rows(arrays, len(static[0]))):
            if dst is not None:
                dst.copy_(torch.from_numpy(np.ascontiguousarray(src)), non_blocking=False)
        graph.replay()
        return out[:n].cpu().numpy()


def probe_rows(model: DensityModel, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``n`` probe rows of ``model``'s data (seeded by ``n``) and their dequantization noise (bin midpoints) for the self-checks."""
    x = model.spec.random_examples(n, seed=n).astype(np.float32)
    return x, (np.full(x.shape, 0.5, dtype=np.float32) if model.dequantizer is not None else None)


def score_numpy(log_prob: Callable[..., torch.Tensor], device: str, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    """``log_prob`` of numpy rows on ``device``: float64 nats ``(B,)``."""
    with torch.inference_mode():
        xt = torch.from_numpy(x).to(device, torch.float32)
        nt = None if noise is None else torch.from_numpy(noise).to(device)
        return log_prob(xt, nt).double().cpu().numpy()


class TorchRunner:
    """A ``DensityModel`` on a torch device, in inference mode.

    Every optimised path is checked against its reference before it serves (:mod:`service.executor.selfcheck`):
    the fused Triton butterfly kernel, ``torch.compile``, CUDA graphs, the traced CPU graph. One that fails
    is off for this model and task, and :attr:`fallbacks` says why (``execution`` too).
    """

    backend = "torch"

    def __init__(self, path: Path, device: str, settings: Settings, quarantine: Quarantine | None = None,
                 fallbacks: list[Fallback] | None = None) -> None:
        self.device = device
        self.model: DensityModel = load(path, device)
        self.manifest = self.model.manifest
        tile = settings.tile_rows if settings.batch_invariant else None
        self.tiles: dict[str, int | None] = {"score": tile, "sample": tile}
        self.execution: dict[str, str] = {}
        self.fallbacks: list[Fallback] = list(fallbacks or [])
        known = quarantine.of(path) if quarantine is not None else []  # paths that faulted the device before a restart
        self._off = {f.path for f in known}
        self.fallbacks += known
        self._log_prob = self.model.log_prob
        self.compiled = False
        self._tasks: dict[str, Callable[..., np.ndarray]] = {"score": self._score_eager, "sample": self._sample_eager}
        try:
            self._check_kernels()
            if settings.compile and "torch.compile" not in self._off:
                self._compile()
            if device.startswith("cuda") and settings.cuda_graphs and "cuda graphs" not in self._off:
                self._capture(settings)
            if device == "cpu" and settings.trace_cpu and not settings.compile and "torchscript" not in self._off:
                self._trace()
        except DeviceFault as e:
            if quarantine is not None:
                quarantine.add(path, e.fallback)
            raise
        for task in self._tasks:
            t = self.tiles[task]
            self.execution.setdefault(task, "eager" + (f", tiles of {t} rows" if t else ""))
        if self.compiled:
            self.execution["score"] += ", compiled"
        for f in self.fallbacks:
            self.execution[f.task] += f" ({f.describe()})"

    def _fall_back(self, fallback: Fallback) -> None:
        log.warning("%s: %s %s; it serves on its reference path", self.manifest.data_spec.source or "model", fallback.task,
                    fallback.describe())
        self.fallbacks.append(fallback)

    # probes and eager forwards on numpy, any number of rows
    def _probe(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        return probe_rows(self.model, n)

    def _latent(self, n: int) -> np.ndarray:
        return np.random.default_rng(n).standard_normal((n, self.model.spec.dims)).astype(np.float32) * 0.5

    def _score_eager(self, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        """The serving forward (compiled when ``torch.compile`` passed its check)."""
        return score_numpy(self._log_prob, self.device, x, noise)

    def _score_reference(self, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        """The model's own forward: every check's reference."""
        return score_numpy(self.model.log_prob, self.device, x, noise)

    def _sample_eager(self, z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model.sample(len(z), 1.0, z=torch.from_numpy(z)).cpu().numpy()

    def _check_kernels(self) -> None:
        """The fused Triton butterfly against the PyTorch levels, where this device would run it."""
        from models.flows.butterfly import Butterfly

        layers = [m for m in self.model.modules() if isinstance(m, Butterfly) and m.kernel != "torch"]
        if not layers:
            return
        if "triton butterfly" in self._off or not any(m._fused(torch.empty(1, m.dim, device=self.device)) for m in layers):
            for m in layers:
                m.kernel = "torch"
            return
        kinds = {m: m.kernel for m in layers}

        def on(enabled: bool) -> None:
            for m in layers:
                m.kernel = kinds[m] if enabled else "torch"

        def reference(fn: Callable[[int], np.ndarray]) -> Callable[[int], np.ndarray]:
            def run(n: int) -> np.ndarray:
                on(False)
                try:
                    return fn(n)
                finally:
                    on(True)
            return run

        score = lambda n: self._score_reference(*self._probe(n))  # noqa: E731
        sample = lambda n: self._sample_eager(self._latent(n))  # noqa: E731
        for task, fn in (("score", score), ("sample", sample)):
            fallback = check(task, "triton butterfly", fn, reference(fn))
            if fallback is not None:
                on(False)  # the whole model: both tasks run the layers
                for t in ("score", "sample"):
                    self._fall_back(Fallback(t, fallback.path, fallback.reason, fallback.detail))
                return

    def _compile(self) -> None:
        """Score through ``torch.compile`` when it compiles and agrees with the uncompiled model."""
        try:
            compiled = torch.compile(self.model.log_prob, dynamic=False)
        except Exception as e:  # noqa: BLE001
            self._fall_back(failed("score", "torch.compile", e))
            return
        self._log_prob = compiled
        fallback = check("score", "torch.compile", lambda n: self._score_eager(*self._probe(n)),
                         lambda n: self._score_reference(*self._probe(n)))
        if fallback is not None:
            self._log_prob = self.model.log_prob
            self._fall_back(fallback)
            return
        self.compiled = True

    def _trace(self) -> None:
        """Score through a traced graph (:mod:`service.executor.traced`), without tiles until the invariance check asks for them."""
        from service.executor.traced import TraceMismatch, trace_score

        try:
            graph = trace_score(self.model)
        except TraceMismatch as e:
            self._fall_back(Fallback("score", "torchscript", "mismatch", str(e)))
            return
        except Exception as e:  # noqa: BLE001 - untraceable Python: stay eager and say why
            self._fall_back(failed("score", "torchscript", e))
            return
        dequantized = self.model.dequantizer is not None

        def score(x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
            args = (torch.from_numpy(np.ascontiguousarray(x, np.float32)),)
            if dequantized:
                args += (torch.from_numpy(np.ascontiguousarray(noise, np.float32)),)
            with torch.inference_mode():
                return graph(*args).numpy()

        fallback = check("score", "torchscript", lambda n: score(*self._probe(n)), lambda n: self._score_reference(*self._probe(n)))
        if fallback is not None:
            self._fall_back(fallback)
            return
        self._tasks["score"] = score
        self.tiles["score"] = None
        self.execution["score"] = "torchscript (traced, oneDNN)"

    def _capture(self, settings: Settings) -> None:
        """Replace each task by its CUDA graphs where capture works and every captured size agrees with eager."""
        spec, dev = self.model.spec, self.device
        tile = self.tiles["score"]
        sizes = [tile] if tile else ladder(settings.max_batch_size)
        dequantized = self.model.dequantizer is not None

        def score_examples(b: int) -> tuple:
            x = torch.from_numpy(spec.random_examples(1).astype(np.float32)).to(dev).repeat(b, *[1] * len(spec.shape))
            return x, (torch.full_like(x, 0.5) if dequantized else None)

        def score(x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
            return self._log_prob(x, noise).double()

        def sample(z: torch.Tensor) -> torch.Tensor:
            return self.model.sample(len(z), 1.0, z=z)

        probes = {"score": (lambda g, n: g(*self._probe(n)), lambda n: self._score_eager(*self._probe(n))),
                  "sample": (lambda g, n: g(self._latent(n)), lambda n: self._sample_eager(self._latent(n)))}
        for task, fn, examples in (("score", score, score_examples),
                                   ("sample", sample, lambda b: (torch.zeros(b, spec.dims, device=dev),))):
            try:
                graphed = GraphedTask(fn, examples, sizes)
            except Exception as e:  # noqa: BLE001 - a host sync or an unsupported op inside the task: stay eager
                torch.cuda.synchronize()
                self._fall_back(failed(task, "cuda graphs", e))
                continue
            replay, eager = probes[task]
            fallback = check(task, "cuda graphs", lambda n: replay(graphed, n), eager, tuple(graphed.sizes))
            if fallback is not None:
                self._fall_back(fallback)
                continue
            self._tasks[task] = graphed
            self.execution[task] = f"cuda graphs at {','.join(map(str, sorted(sizes)))} rows"

    def _run(self, task: str, arrays: Arrays) -> np.ndarray:
        fn = self._tasks[task]
        if isinstance(fn, GraphedTask):
            return in_tiles(fn, arrays, self.tiles[task] or fn.sizes[-1])
        return in_tiles(fn, arrays, self.tiles[task])

    def log_prob(self, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        if noise is None and self.model.dequantizer is not None:
            # traced and captured graphs take the dequantization noise as an input; eager draws it
            return in_tiles(self._score_eager, (x, noise), self.tiles["score"])
        return self._run("score", (x, noise))

    def sample(self, z: np.ndarray) -> np.ndarray:
        return self._run("sample", (z,))


class OnnxRunner:
    """The artifact's ONNX graphs in ONNX Runtime sessions (CUDA provider on a GPU device).

    onnxruntime falls back to the CPU silently when CUDA cannot be used, so the providers a
    session really got are checked; with ``require_gpu`` a CPU fallback is an error. On CUDA the
    inputs and outputs are bound to device buffers (IO binding).
    """

    backend = "onnxruntime"

    def __init__(self, path: Path, device: str, settings: Settings) -> None:
        import onnxruntime as ort

        self.manifest = read_manifest(path)
        verify(path, self.manifest)
        if self.manifest.graphs.score is None or self.manifest.graphs.sample is None:
            raise ArtifactError(f"{path}: no ONNX graphs; run `flowserve export {path}` or use FLOWSERVE_BACKEND=torch")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings.ort_threads or torch.get_num_threads()
        opts.enable_cpu_mem_arena = settings.ort_cpu_arena
        providers: list = ["CPUExecutionProvider"]
        self._device_id = int(device.partition(":")[2] or 0) if device.startswith("cuda") else None
        if self._device_id is not None:
            providers = [("CUDAExecutionProvider", {"device_id": self._device_id}), "CPUExecutionProvider"]
        self.sessions = {}
        for task in ("score", "sample"):
            file = self.manifest.graphs.of(task).file
            sess = open_session(path / file, self.manifest.files.get(file), opts, providers, settings.ort_cache_dir)
            if device.startswith("cuda") and "CUDAExecutionProvider" not in sess.get_providers():
                if settings.require_gpu:
                    raise RuntimeError(f"ONNX Runtime cannot use CUDA for {device} (providers {sess.get_providers()}) and FLOWSERVE_REQUIRE_GPU=1")
                log.warning("ONNX Runtime fell back to %s for %s", sess.get_providers(), device)
            self.sessions[task] = sess
        on_gpu = "CUDAExecutionProvider" in self.sessions["score"].get_providers()
        self.device = device if on_gpu else "cpu"
        # ONNX Runtime's CPU kernels are mostly batch-invariant (the load check tiles where not); cuDNN/cuBLAS are not.
        tile = settings.tile_rows if on_gpu and settings.batch_invariant else None
        self.tiles: dict[str, int | None] = {"score": tile, "sample": tile}
        mode = "io binding, CUDA provider" if on_gpu else "session run, CPU provider"
        self.execution = {t: mode + (f", tiles of {tile} rows" if tile else "") for t in self.sessions}

    def _infer(self, task: str, output: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        sess = self.sessions[task]
        if self._device_id is None or self.device == "cpu":
            return sess.run([output], feeds)[0]
        import onnxruntime as ort

        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", self._device_id))
        binding.bind_output(output, "cuda", self._device_id)
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _score(self, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        feeds = {"x": x.astype(np.float32, copy=False)}
        if noise is not None:
            feeds["noise"] = noise.astype(np.float32, copy=False)
        return self._infer("score", "log_prob", feeds).astype(np.float64)

    def _sample(self, z: np.ndarray) -> np.ndarray:
        return self._infer("sample", "x", {"z": z.astype(np.float32, copy=False), "temperature": np.array(1.0, dtype=np.float32)})

    def log_prob(self, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        return in_tiles(self._score, (x, noise), self.tiles["score"])

    def sample(self, z: np.ndarray) -> np.ndarray:
        return in_tiles(self._sample, (z,), self.tiles["sample"])


def choose_backend(manifest: Manifest, setting: str) -> str:
    """``FLOWSERVE_BACKEND`` wins; ``auto`` takes the manifest's ``preferred_backend``, else torch."""
    if setting != "auto":
        return setting
    return manifest.graphs.preferred_backend


def check_onnx(runner: OnnxRunner, path: Path) -> Fallback | None:
    """ONNX Runtime's scores against the artifact's torch model on the CPU, on probe rows (``None``: they agree)."""
    reference = load(path, "cpu")
    return check("score", "onnxruntime cuda", lambda n: runner.log_prob(*probe_rows(reference, n)),
                 lambda n: score_numpy(reference.log_prob, "cpu", *probe_rows(reference, n)))


def open_runner(path: Path, device: str, settings: Settings, quarantine: Quarantine | None = None) -> Runner:
    """Open the artifact at ``path`` on ``device`` with the configured backend. ONNX Runtime on CUDA is checked
    against the torch model first; when it disagrees (or faulted the device before), the torch backend serves."""
    manifest = read_manifest(path)
    backend = choose_backend(manifest, settings.backend)
    fallbacks: list[Fallback] = []
    if backend == "onnxruntime":
        off = [f for f in (quarantine.of(path) if quarantine is not None else []) if f.path == "onnxruntime cuda"]
        if not (device.startswith("cuda") and off):
            runner = OnnxRunner(path, device, settings)
            if runner.device == "cpu":
                return runner
            try:
                fallback = check_onnx(runner, path)
            except DeviceFault as e:
                if quarantine is not None:
                    quarantine.add(path, e.fallback)
                raise
            if fallback is None:
                return runner
            log.warning("%s: %s; the torch backend serves it", path, fallback.describe())
            off = [fallback]
        fallbacks = off
    if settings.require_gpu and not device.startswith("cuda"):
        raise RuntimeError(f"FLOWSERVE_REQUIRE_GPU=1 but the worker device is {device}")
    return TorchRunner(path, device, settings, quarantine, fallbacks)

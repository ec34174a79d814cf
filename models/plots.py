"""PNG plots of waveform windows (matplotlib's object API with the Agg canvas: no pyplot global state).

``windows (N, C, T)`` are drawn one panel per window, one trace per channel, time in seconds at
:data:`~models.data.mimic_schema.SAMPLE_RATE_HZ`; attributed segments are shaded with an opacity
that grows with their share of the window's largest attribution.
"""

from __future__ import annotations

import io

import numpy as np

from .data.mimic_schema import SAMPLE_RATE_HZ

MAX_PANELS = 16


def waveform_png(windows: np.ndarray, channels: list[str], units: list[str] | None = None, titles: list[str] | None = None,
                 shaded: list[list[dict]] | None = None, rate_hz: float = SAMPLE_RATE_HZ) -> bytes:
    """A PNG of up to :data:`MAX_PANELS` windows; ``shaded[i]`` are segments ``{"start", "end", "nats"}`` (samples) of window i."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w = np.asarray(windows, dtype=np.float64)[:MAX_PANELS]
    n, c, t = w.shape
    fig = Figure(figsize=(10, 1.6 * c * n + 0.4), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n * c, 1, sharex=True, squeeze=False)[:, 0]
    time = np.arange(t) / rate_hz
    colors = ("tab:blue", "tab:red", "tab:green", "tab:purple")
    for i in range(n):
        segs = (shaded[i] if shaded and i < len(shaded) else None) or []
        top = max((s["nats"] for s in segs), default=0.0)
        for k in range(c):
            ax = axes[i * c + k]
            ax.plot(time, w[i, k], lw=0.8, color=colors[k % len(colors)])
            label = channels[k] if k < len(channels) else f"ch{k}"
            ax.set_ylabel(label if not units or k >= len(units) else f"{label}\n[{units[k]}]"[:40], fontsize=7)
            ax.tick_params(labelsize=7)
            for s in segs:
                if top > 0 and s["nats"] > 0:
                    ax.axvspan(s["start"] / rate_hz, s["end"] / rate_hz, color="orange", alpha=0.15 + 0.45 * s["nats"] / top, lw=0)
            if k == 0 and titles and i < len(titles):
                ax.set_title(titles[i], fontsize=8, loc="left")
    axes[-1].set_xlabel("time [s]", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

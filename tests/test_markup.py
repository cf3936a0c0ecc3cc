"""Names from a shared link, an upload or a model's files are shown as text (issue 26, A).

Streamlit renders Markdown in alerts, captions, labels and progress texts, Plotly a subset
of HTML in chart text. A link naming ``[Session expired: log in again](http://attacker/login)``
as its fine-tune put a working link inside the page's own red error. Here every page opened
on crafted names in Streamlit's AppTest: every Markdown body and label the page sends is
rendered by a CommonMark renderer and must hold no link, no image and no bare address.
The browser test (tests/test_markup_browser.py) checks the same in Chromium.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from charts.style import chart_text
from ui.text import WORD_JOINER, escape_markdown

APP = str(Path(__file__).resolve().parent.parent / "app.py")

#: Crafted names, as a link would carry them (the image points at no server: AppTest
#: renders nothing, the rendered Markdown is checked instead).
LINK = "[Session expired: log in again](http://attacker/login)"
IMAGE = "![x](http://attacker/pixel.png?v=1)"
RAW = "<img src=http://attacker/raw.png><a href=http://attacker/raw>raw</a>"
BARE = "http://attacker/bare www.attacker.example me@attacker.example :red[red] $x$"
SERIES = "series:[Series expired](http://attacker/series)"
BASE = "[Base expired](http://attacker/base)"

PAGES = ("pages/overview.py", "pages/models.py", "pages/spectrum.py", "pages/mitigate.py", "pages/series.py")


def _markdown_bodies(at: AppTest) -> list[str]:
    """Every Markdown text the page sends: alerts, captions, Markdown, and widget labels."""
    bodies = [e.value for kind in ("error", "warning", "info", "success", "markdown", "caption") for e in at.get(kind)]
    for kind in ("expander", "button", "metric", "selectbox", "multiselect", "radio", "text_input", "page_link"):
        bodies += [str(getattr(e.proto, "label", "")) for e in at.get(kind)]
    bodies += [str(getattr(e.proto, "help", "")) for kind in ("metric", "button") for e in at.get(kind)]
    bodies += [e.proto.text for e in at.get("progress") if hasattr(e, "proto")]
    return [b for b in bodies if b]


def _rendered(body: str) -> str:
    return MarkdownIt("commonmark").render(body)


def _unsafe(bodies: list[str]) -> list[str]:
    """The bodies whose rendering holds a link, an image, raw HTML or a bare address."""
    found = []
    for body in bodies:
        html = _rendered(body)
        if "<a " in html or "<img" in html or "http://attacker" in html or "www.attacker" in html:
            found.append(body)
        elif "@attacker" in html.replace("@" + WORD_JOINER, ""):
            found.append(body)
    return found


def test_escaped_names_render_as_the_same_text() -> None:
    for text in (LINK, IMAGE, RAW, BARE, SERIES, "LoRA r=8 (stand-in)", "a\\b `c` **d** _e_ # f | g ~h~"):
        html = _rendered(escape_markdown(text))
        assert "<a " not in html and "<img" not in html and "<em>" not in html and "<code>" not in html
        shown = html.removeprefix("<p>").removesuffix("</p>\n").replace(WORD_JOINER, "")
        unescaped = shown.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
        assert unescaped == text
    assert escape_markdown("two\nlines") == "two lines"
    assert chart_text("<a href=x>a & b</a>") == "&lt;a href=x&gt;a &amp; b&lt;/a&gt;"


@pytest.mark.parametrize("page", PAGES)
def test_crafted_names_in_a_link_are_text_on_every_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page: str
) -> None:
    monkeypatch.setenv("WSE_CACHE_DIR", str(tmp_path / "cache"))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = BASE
    at.query_params["tuned"] = [LINK, IMAGE, RAW, BARE, SERIES]
    at.run()
    from ui import runtime

    at.switch_page(page).run()
    for job in runtime.manager().jobs():
        assert job.wait(60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    bodies = _markdown_bodies(at)
    assert any("attacker" in b for b in bodies), f"{page}: the crafted names are not shown at all"
    unsafe = _unsafe(bodies)
    assert not unsafe, f"{page}: Markdown that renders a link or an image: {unsafe}"


def _figure_texts(fig: go.Figure) -> list[str]:
    """Every text of a figure that Plotly renders with its HTML subset."""
    texts = [fig.layout.title.text or ""]
    texts += [a.text or "" for a in fig.layout.annotations]
    for trace in fig.data:
        texts += [str(trace.name or ""), str(trace.hovertemplate or "")]
        for values in (trace.customdata, getattr(trace, "x", None), getattr(trace, "y", None)):
            if values is not None:
                texts += [str(v) for v in _flat(values)]
    for axis in ("xaxis", "yaxis"):
        texts += [str(t) for t in (fig.layout[axis].ticktext or ())]
    return texts


def _flat(values):
    for v in values:
        if isinstance(v, (list, tuple)) or getattr(v, "ndim", 0):
            yield from _flat(v)
        else:
            yield v


def test_chart_text_of_crafted_names_is_escaped(tiny_bert: Path, tiny_bert_full_ft: Path, tmp_path: Path) -> None:
    """A fine-tune's label and its tensors' names (from its files) in titles, legends,
    hovers and ticks: no tag Plotly would render."""
    from dataclasses import replace

    from analysis.compare import compare
    from charts import comparison, overview, series, spectra

    found = compare(str(tiny_bert), [str(tiny_bert_full_ft)], cache=None, device="cpu").models[0]
    crafted = replace(
        found,
        summary={**found.summary, "label": RAW},
        matrices=[replace(m, id=replace(m.id, module="<b>" + m.module + "</b>")) for m in found.matrices],
    )
    figures = [
        *[fig for s in overview.overview_sections([crafted], "intruders", 10, 0.5) for fig in s.panels],
        overview.totals_figure([crafted], 10, 0.5),
        comparison.sweep_figure([crafted], 10, [0.1, 0.5]),
        comparison.breakdown_figure([crafted], 10, 0.5, "module"),
        comparison.effective_rank_figure([crafted]),
        spectra.spectrum_figure(crafted.matrices[0], 10, 0.5, label=RAW),
        spectra.similarity_figure(crafted.matrices[0], 10, 0.5, label=RAW),
        spectra.subspace_figure(np.ones((2, 2)), RAW, LINK, RAW),
        series.series_trend_figure(
            pd.DataFrame({"group": [RAW], "step": [1], **{k: [1.0] for k in _series_metrics()}}), "model", RAW
        ),
    ]
    for fig in figures:
        texts = _figure_texts(fig)
        assert any("attacker" in t for t in texts), fig.layout.title.text
        tags = [t for t in texts if "<a " in t or "<img" in t or ("<b>" in t and "%{" not in t)]
        assert not tags, tags


def _series_metrics() -> list[str]:
    from charts import series_tables

    return list(series_tables.SERIES_METRICS)
